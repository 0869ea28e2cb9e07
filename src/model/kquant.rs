//! llama.cpp's K-quant blocks (Q4_K, Q5_K, Q6_K): their layouts, dequantization, and `y = x W^T` read straight
//! from the blocks.
//!
//! Each block holds 256 weights of one row, little-endian, exactly as ggml stores it:
//! - Q4_K, 144 bytes: `d` (f16), `dmin` (f16), 12 bytes packing eight 6-bit scales `sc` and eight 6-bit minimums
//!   `mn`, 128 bytes of nibbles. Weight `l` of sub-block `j` (32 weights) is `(d * sc_j) * q - dmin * mn_j`; its
//!   nibble is in byte `32 * (j / 2) + l`, low for even `j`, high for odd.
//! - Q5_K, 176 bytes: Q4_K's header, then 32 bytes of fifth bits (bit `j` of byte `l` is bit 4 of weight `l` of
//!   sub-block `j`), then the 128 bytes of nibbles.
//! - Q6_K, 210 bytes: 128 bytes of low nibbles, 64 bytes of 2-bit high parts, sixteen i8 scales (one per 16
//!   weights), `d` (f16). Weight = `(d * sc) * (q - 32)` with `q` six bits. Each half of 128 weights uses 64
//!   nibble bytes and 32 high bytes: its four runs of 32 weights take the low nibbles of bytes 0..32 and 32..64,
//!   then their high nibbles, with high bits 0-1, 2-3, 4-5, 6-7 of the same 32 high bytes.
//!
//! [`matmul_t`] keeps the activations f32: each 32-weight sub-block is expanded in registers to the f32 values
//! [`dequantize_row`] produces (same operations, same rounding: multiply, then subtract) and multiplied into f32
//! accumulators, so the product differs from the f32 path on the dequantized matrix only in summation order.
//! llama.cpp instead rounds the activations to 8 bits per 256 (its Q8_K) and multiplies integers: fewer
//! instructions per weight, plus a rounding error of up to 0.4% of the largest of each 256 activations.
//! [`matmul_t_q8k`] does that for Q4_K, for speed; on this project's 2-core machine the f32 kernel is about as
//! much bound by its expansion work as by reading the blocks (two threads run a 7B layer 1.6x faster than one).

use super::linalg::SendPtr;
use crate::error::{CageError, Result};
use crate::model::gguf::GgmlType;
use rayon::prelude::*;

mod q8k;
pub use q8k::matmul_t_q8k;

/// Weights per K-quant block.
pub const QK_K: usize = 256;

/// Bytes per block of a K-quant type, or `None` for the other types.
pub fn block_bytes(ty: GgmlType) -> Option<usize> {
    matches!(ty, GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K).then(|| ty.block().1)
}

#[inline(always)]
fn f16_at(b: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// The 6-bit scale and minimum of sub-block `j` from Q4_K/Q5_K's 12 scale bytes: bytes 0..4 hold the scales of
/// sub-blocks 0..4 and bytes 4..8 their minimums (low six bits each); sub-blocks 4..8 take their low four bits
/// from the nibbles of bytes 8..12 (scale low, minimum high) and their top two bits from the top bits of bytes
/// 0..4 (scales) and 4..8 (minimums).
#[inline(always)]
fn scale_min(s: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        ((s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4))
    }
}

/// The multiplier and subtrahend of each Q4_K/Q5_K sub-block: `(d * sc_j, dmin * mn_j)`.
#[inline(always)]
fn q45_scales(b: &[u8]) -> [(f32, f32); 8] {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    std::array::from_fn(|j| {
        let (sc, mn) = scale_min(&b[4..16], j);
        (d * sc as f32, dmin * mn as f32)
    })
}

/// Dequantizes one block (`b` exactly one block of `ty`, `out` 256 floats).
fn dequantize_block(ty: GgmlType, b: &[u8], out: &mut [f32]) {
    match ty {
        GgmlType::Q4K | GgmlType::Q5K => {
            let (qh, qs) = if ty == GgmlType::Q5K { (&b[16..48], &b[48..176]) } else { (&b[16..16], &b[16..144]) };
            for (j, (dj, mj)) in q45_scales(b).into_iter().enumerate() {
                let nib = &qs[32 * (j / 2)..32 * (j / 2) + 32];
                let shift = 4 * (j % 2);
                for (l, o) in out[32 * j..32 * j + 32].iter_mut().enumerate() {
                    let mut q = (nib[l] >> shift) & 0x0f;
                    if !qh.is_empty() {
                        q |= ((qh[l] >> j) & 1) << 4;
                    }
                    *o = dj * q as f32 - mj;
                }
            }
        }
        GgmlType::Q6K => {
            let (ql, qh, sc) = (&b[..128], &b[128..192], &b[192..208]);
            let d = f16_at(b, 208);
            for j in 0..8 {
                let (h, p) = (j / 4, j % 4);
                let nib = &ql[64 * h + 32 * (p % 2)..64 * h + 32 * (p % 2) + 32];
                let high = &qh[32 * h..32 * h + 32];
                let s = [d * sc[2 * j] as i8 as f32, d * sc[2 * j + 1] as i8 as f32];
                for (l, o) in out[32 * j..32 * j + 32].iter_mut().enumerate() {
                    let q = ((nib[l] >> (4 * (p / 2))) & 0x0f) | (((high[l] >> (2 * p)) & 3) << 4);
                    *o = s[l / 16] * (q as i32 - 32) as f32;
                }
            }
        }
        _ => unreachable!("dequantize_block is only called with K-quant types"),
    }
}

/// Dequantizes whole blocks of a K-quant type: `raw` holds `out.len() / 256` blocks.
///
/// # Panics
/// If `ty` is not Q4_K, Q5_K or Q6_K, or the lengths disagree (callers size both from a checked tensor).
pub fn dequantize_row(ty: GgmlType, raw: &[u8], out: &mut [f32]) {
    let bytes = block_bytes(ty).expect("dequantize_row: not a K-quant type");
    assert!(
        out.len().is_multiple_of(QK_K) && raw.len() == out.len() / QK_K * bytes,
        "dequantize_row: {} bytes of {ty:?} do not hold {} weights",
        raw.len(),
        out.len()
    );
    for (o, b) in out.chunks_exact_mut(QK_K).zip(raw.chunks_exact(bytes)) {
        dequantize_block(ty, b, o);
    }
}

/// `out[m x n] (+)= alpha * x[m x k] * W^T`, with `W` `[n x k]` stored as `raw`: the `k / 256` blocks of row 0,
/// then those of row 1, and so on (a GGUF tensor's data). Output rows are split across rayon's threads; each
/// block is expanded once for up to eight rows of `x`.
#[allow(clippy::too_many_arguments)]
pub fn matmul_t(
    ty: GgmlType,
    raw: &[u8],
    x: &[f32],
    m: usize,
    k: usize,
    n: usize,
    out: &mut [f32],
    accumulate: bool,
    alpha: f32,
) -> Result<()> {
    matmul_t_on(isa(), ty, raw, x, m, k, n, out, accumulate, alpha)
}

#[allow(clippy::too_many_arguments)]
fn matmul_t_on(
    isa: Isa,
    ty: GgmlType,
    raw: &[u8],
    x: &[f32],
    m: usize,
    k: usize,
    n: usize,
    out: &mut [f32],
    accumulate: bool,
    alpha: f32,
) -> Result<()> {
    let bytes = check(ty, raw, x, m, k, n, out)?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    let job = Job { ty, raw, bytes, x, m, k, n, out: SendPtr(out.as_mut_ptr()), accumulate, alpha };
    (0..n.div_ceil(ROWS)).into_par_iter().for_each(|c| match isa {
        // SAFETY: the CPU supports AVX2 and FMA (detected); the shapes were checked above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe {
            match ty {
                GgmlType::Q4K => job.run_avx2::<Q4>(c),
                GgmlType::Q5K => job.run_avx2::<Q5>(c),
                _ => job.run_avx2::<Q6>(c),
            }
        },
        Isa::Portable => job.run(c),
    });
    Ok(())
}

/// Checks a product's type and shapes against its buffers; the block size in bytes.
fn check(ty: GgmlType, raw: &[u8], x: &[f32], m: usize, k: usize, n: usize, out: &[f32]) -> Result<usize> {
    let bad = |msg: String| Err(CageError::InvalidArgument(format!("K-quant matmul: {msg}")));
    let Some(bytes) = block_bytes(ty) else {
        return bad(format!("{ty:?} is not a K-quant type (Q4_K, Q5_K, Q6_K)"));
    };
    if !k.is_multiple_of(QK_K) {
        return bad(format!("row length {k} is not a multiple of the block size {QK_K}"));
    }
    let want = (k / QK_K).checked_mul(bytes).and_then(|r| r.checked_mul(n));
    if want != Some(raw.len()) {
        return bad(format!("{} bytes of {ty:?} are not a {n} x {k} matrix ({want:?} bytes)", raw.len()));
    }
    if m.checked_mul(k).is_none_or(|e| x.len() < e) || m.checked_mul(n).is_none_or(|e| out.len() < e) {
        return bad(format!(
            "buffers of {} inputs and {} outputs are smaller than {m} x {k} and {m} x {n}",
            x.len(),
            out.len()
        ));
    }
    Ok(bytes)
}

/// Which kernel the CPU runs (the standard library caches the detection).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Isa {
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Portable,
}

fn isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        return Isa::Avx2;
    }
    Isa::Portable
}

/// Output rows per parallel task.
const ROWS: usize = 16;

/// How far ahead of the block being expanded the AVX2 kernel prefetches (bytes): a batch-1 step streams the
/// whole matrix once, and the hardware prefetcher alone leaves too few loads in flight (see `packed`).
const PREFETCH: usize = 1024;

/// The type selectors of the AVX2 kernel's const parameter.
const Q4: u8 = 0;
const Q5: u8 = 1;
const Q6: u8 = 2;

impl SendPtr {
    /// The pointer; through a method, a closure captures the wrapper (Sync), not its raw field.
    fn ptr(&self) -> *mut f32 {
        self.0
    }
}

/// One checked product.
struct Job<'a> {
    ty: GgmlType,
    raw: &'a [u8],
    bytes: usize,
    x: &'a [f32],
    m: usize,
    k: usize,
    n: usize,
    out: SendPtr,
    accumulate: bool,
    alpha: f32,
}

impl Job<'_> {
    /// Writes `alpha * v` to (or adds it to) `out[r * n + o]`.
    #[inline(always)]
    fn store(&self, r: usize, o: usize, v: f32) {
        // SAFETY: each (r, o) is written by exactly one task; out holds m * n floats (checked).
        unsafe {
            let p = self.out.0.add(r * self.n + o);
            *p = if self.accumulate { *p + self.alpha * v } else { self.alpha * v };
        }
    }

    /// Output rows `chunk * ROWS ..` (portable): each block is dequantized once for up to eight rows of x.
    fn run(&self, chunk: usize) {
        let (m, k) = (self.m, self.k);
        let nb = k / QK_K;
        let mut wb = [0f32; QK_K];
        let mut acc = [[0f32; 8]; 8];
        for o in chunk * ROWS..((chunk + 1) * ROWS).min(self.n) {
            for r0 in (0..m).step_by(8) {
                let rm = (m - r0).min(8);
                for a in acc.iter_mut().take(rm) {
                    *a = [0f32; 8];
                }
                for b in 0..nb {
                    let at = (o * nb + b) * self.bytes;
                    dequantize_block(self.ty, &self.raw[at..at + self.bytes], &mut wb);
                    for (r, a) in acc.iter_mut().enumerate().take(rm) {
                        let xr = &self.x[(r0 + r) * k + b * QK_K..][..QK_K];
                        // Eight lanes: straight-line code the vectorizer maps onto one register.
                        for (w8, x8) in wb.chunks_exact(8).zip(xr.chunks_exact(8)) {
                            for i in 0..8 {
                                a[i] += w8[i] * x8[i];
                            }
                        }
                    }
                }
                for (r, h) in acc.iter().enumerate().take(rm) {
                    let v = ((h[0] + h[4]) + (h[1] + h[5])) + ((h[2] + h[6]) + (h[3] + h[7]));
                    self.store(r0 + r, o, v);
                }
            }
        }
    }

    /// Output rows `chunk * ROWS ..` with AVX2, in tiles of up to eight rows of x.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run_avx2<const T: u8>(&self, chunk: usize) {
        let mut r0 = 0;
        while r0 < self.m {
            // SAFETY (all arms): AVX2 and FMA are enabled here; rows r0 .. r0 + R exist.
            unsafe {
                match self.m - r0 {
                    1 => self.tile_avx2::<T, 1>(chunk, r0),
                    2 => self.tile_avx2::<T, 2>(chunk, r0),
                    3 => self.tile_avx2::<T, 3>(chunk, r0),
                    4 => self.tile_avx2::<T, 4>(chunk, r0),
                    5 => self.tile_avx2::<T, 5>(chunk, r0),
                    6 => self.tile_avx2::<T, 6>(chunk, r0),
                    7 => self.tile_avx2::<T, 7>(chunk, r0),
                    _ => self.tile_avx2::<T, 8>(chunk, r0),
                }
            }
            r0 += 8;
        }
    }

    /// Rows `r0 .. r0 + R` of x against the chunk's output rows: each 32-weight sub-block is expanded into four
    /// registers of f32 weights (the values of [`dequantize_row`], bit for bit) and multiplied into every row.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile_avx2<const T: u8, const R: usize>(&self, chunk: usize, r0: usize) {
        use std::arch::x86_64::*;
        // Independent accumulation chains per row so the FMA latency does not bound one or two rows; 16 vector
        // registers hold at most eight rows of one chain besides the four weight registers.
        let nacc = if R <= 2 {
            4
        } else if R <= 4 {
            2
        } else {
            1
        };
        let (k, nb) = (self.k, self.k / QK_K);
        let xp = self.x.as_ptr();
        let rp = self.raw.as_ptr();
        // SAFETY: block offsets stay below n * nb * bytes = raw.len() and x reads below m * k (checked by the
        // caller); unaligned loads only; prefetches never fault.
        unsafe {
            for o in chunk * ROWS..((chunk + 1) * ROWS).min(self.n) {
                let mut acc = [[_mm256_setzero_ps(); 4]; R];
                for b in 0..nb {
                    let blk = rp.add((o * nb + b) * self.bytes);
                    for line in 0..self.bytes.div_ceil(64) {
                        _mm_prefetch::<_MM_HINT_T0>(blk.wrapping_add(PREFETCH + 64 * line).cast());
                    }
                    let scales =
                        if T == Q6 { [(0.0, 0.0); 8] } else { q45_scales(std::slice::from_raw_parts(blk, 16)) };
                    for (j, &(dj, mj)) in scales.iter().enumerate() {
                        let w = match T {
                            Q4 => expand_q45(blk.add(16 + 32 * (j / 2)), None, j, dj, mj),
                            Q5 => expand_q45(blk.add(48 + 32 * (j / 2)), Some(blk.add(16)), j, dj, mj),
                            _ => expand_q6(blk, j),
                        };
                        for (r, a) in acc.iter_mut().enumerate() {
                            let xr = xp.add((r0 + r) * k + b * QK_K + 32 * j);
                            for (c, wc) in w.iter().enumerate() {
                                let i = c % nacc;
                                a[i] = _mm256_fmadd_ps(*wc, _mm256_loadu_ps(xr.add(8 * c)), a[i]);
                            }
                        }
                    }
                }
                for (r, a) in acc.iter().enumerate() {
                    let mut s = a[0];
                    for ai in a.iter().take(nacc).skip(1) {
                        s = _mm256_add_ps(s, *ai);
                    }
                    self.store(r0 + r, o, crate::model::linalg::hsum8(s));
                }
            }
        }
    }
}

/// The 32 bytes at `p` widened to f32 in four registers of eight, unsigned or signed.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
fn widen<const SIGNED: bool>(v: std::arch::x86_64::__m256i) -> [std::arch::x86_64::__m256; 4] {
    use std::arch::x86_64::*;
    let halves = [_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v)];
    let f = |h: __m128i| {
        let i = if SIGNED { _mm256_cvtepi8_epi32(h) } else { _mm256_cvtepu8_epi32(h) };
        _mm256_cvtepi32_ps(i)
    };
    [f(halves[0]), f(_mm_srli_si128::<8>(halves[0])), f(halves[1]), f(_mm_srli_si128::<8>(halves[1]))]
}

/// Sub-block `j` of a Q4_K (`qh` none) or Q5_K block: `nib` points at the 32 nibble bytes holding it, `qh` at the
/// 32 fifth-bit bytes; weights `dj * q - mj` in the order and rounding of [`dequantize_block`].
///
/// # Safety
/// `nib` and `qh` must be readable for 32 bytes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn expand_q45(
    nib: *const u8,
    qh: Option<*const u8>,
    j: usize,
    dj: f32,
    mj: f32,
) -> [std::arch::x86_64::__m256; 4] {
    use std::arch::x86_64::*;
    let low4 = _mm256_set1_epi8(0x0f);
    // SAFETY: the caller guarantees 32 readable bytes at nib and qh.
    let v = unsafe { _mm256_loadu_si256(nib.cast()) };
    // Shifting 16-bit lanes moves bits across byte boundaries; the mask keeps each byte's own nibble.
    let mut q = _mm256_and_si256(if j.is_multiple_of(2) { v } else { _mm256_srli_epi16::<4>(v) }, low4);
    if let Some(qh) = qh {
        // SAFETY: as above.
        let h = unsafe { _mm256_loadu_si256(qh.cast()) };
        let bit = _mm256_and_si256(_mm256_srl_epi16(h, _mm_cvtsi32_si128(j as i32)), _mm256_set1_epi8(1));
        q = _mm256_or_si256(q, _mm256_slli_epi16::<4>(bit));
    }
    let (d, mn) = (_mm256_set1_ps(dj), _mm256_set1_ps(mj));
    widen::<false>(q).map(|f| _mm256_sub_ps(_mm256_mul_ps(d, f), mn))
}

/// Sub-block `j` of the Q6_K block at `b`: weights `(d * sc) * (q - 32)`, the first 16 with scale `2j`, the
/// rest with `2j + 1`, as [`dequantize_block`] rounds them.
///
/// # Safety
/// `b` must be readable for one Q6_K block (210 bytes).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn expand_q6(b: *const u8, j: usize) -> [std::arch::x86_64::__m256; 4] {
    use std::arch::x86_64::*;
    let (h, p) = (j / 4, j % 4);
    // SAFETY: all offsets lie inside the block (the caller guarantees 210 readable bytes).
    let (v, hi, d, s0, s1) = unsafe {
        (
            _mm256_loadu_si256(b.add(64 * h + 32 * (p % 2)).cast()),
            _mm256_loadu_si256(b.add(128 + 32 * h).cast()),
            half::f16::from_bits(u16::from_le_bytes([*b.add(208), *b.add(209)])).to_f32(),
            *b.add(192 + 2 * j) as i8 as f32,
            *b.add(193 + 2 * j) as i8 as f32,
        )
    };
    let low4 = _mm256_set1_epi8(0x0f);
    let nib = _mm256_and_si256(if p < 2 { v } else { _mm256_srli_epi16::<4>(v) }, low4);
    let top = _mm256_and_si256(_mm256_srl_epi16(hi, _mm_cvtsi32_si128(2 * p as i32)), _mm256_set1_epi8(3));
    let q = _mm256_sub_epi8(_mm256_or_si256(nib, _mm256_slli_epi16::<4>(top)), _mm256_set1_epi8(32));
    let (s0, s1) = (_mm256_set1_ps(d * s0), _mm256_set1_ps(d * s1));
    let [a, b, c, e] = widen::<true>(q);
    [_mm256_mul_ps(s0, a), _mm256_mul_ps(s0, b), _mm256_mul_ps(s1, c), _mm256_mul_ps(s1, e)]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A few valid blocks of each type from a small generator: every kernel this CPU can run must expand them to
    /// exactly the dequantized weights (equal f32 values, so bit for bit but for the sign of zero) (one row of x per input column of the identity), and agree with the
    /// portable kernel at every tile split.
    #[test]
    fn kernels_expand_blocks_to_the_dequantized_weights() {
        let mut isas = vec![Isa::Portable];
        #[cfg(target_arch = "x86_64")]
        if isa() == Isa::Avx2 {
            isas.push(Isa::Avx2);
        }
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        let mut byte = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 24) as u8
        };
        for ty in [GgmlType::Q4K, GgmlType::Q5K, GgmlType::Q6K] {
            let bytes = block_bytes(ty).unwrap();
            let (n, k) = (3, 2 * QK_K);
            let mut raw: Vec<u8> = (0..n * 2 * bytes).map(|_| byte()).collect();
            // Finite f16 scales: exponent bits below the all-ones pattern.
            let d_at: &[usize] = if ty == GgmlType::Q6K { &[208] } else { &[0, 2] };
            for blk in raw.chunks_exact_mut(bytes) {
                for &a in d_at {
                    blk[a + 1] &= 0x3b;
                }
            }
            let mut w = vec![0f32; n * k];
            dequantize_row(ty, &raw, &mut w);
            let eye: Vec<f32> = (0..k * k).map(|i| if i % (k + 1) == 0 { 1.0 } else { 0.0 }).collect();
            for &isa in &isas {
                let mut got = vec![0f32; k * n];
                matmul_t_on(isa, ty, &raw, &eye, k, k, n, &mut got, false, 1.0).unwrap();
                for o in 0..n {
                    for i in 0..k {
                        // Equal as floats: a weight of -0 (negative scale, q = 0) sums to +0 with the zeros.
                        assert_eq!(got[i * n + o], w[o * k + i], "{ty:?} {isa:?} row {o} col {i}");
                    }
                }
            }
        }
    }

    #[test]
    fn q4_k_scale_packing_follows_ggml() {
        // Sub-blocks 0..4: low six bits of bytes 0..4 (scales) and 4..8 (minimums); 4..8: nibbles of bytes 8..12
        // plus the top two bits of bytes 0..8.
        let s = [0xc1u8, 0x02, 0x03, 0x44, 0x85, 0x06, 0x07, 0x08, 0x9a, 0x0b, 0x0c, 0x0d];
        assert_eq!(scale_min(&s, 0), (0x01, 0x05));
        assert_eq!(scale_min(&s, 3), (0x04, 0x08));
        assert_eq!(scale_min(&s, 4), (0x0a | (3 << 4), 0x09 | (2 << 4)));
        assert_eq!(scale_min(&s, 7), (0x0d | (1 << 4), 0x00));
    }

    #[test]
    fn bad_shapes_are_errors() {
        let raw = vec![0u8; 144];
        let x = vec![0f32; 256];
        let mut out = vec![0f32; 1];
        assert!(matmul_t(GgmlType::Q4K, &raw, &x, 1, 256, 1, &mut out, false, 1.0).is_ok());
        let e = matmul_t(GgmlType::Q5K, &raw, &x, 1, 256, 1, &mut out, false, 1.0).unwrap_err();
        assert!(e.to_string().contains("not a 1 x 256 matrix"), "{e}");
        let e = matmul_t(GgmlType::Q8_0, &raw, &x, 1, 256, 1, &mut out, false, 1.0).unwrap_err();
        assert!(e.to_string().contains("not a K-quant type"), "{e}");
        let e = matmul_t(GgmlType::Q4K, &raw, &x, 2, 256, 1, &mut out, false, 1.0).unwrap_err();
        assert!(e.to_string().contains("smaller"), "{e}");
        let e = matmul_t(GgmlType::Q4K, &raw, &x, 1, 128, 1, &mut out, false, 1.0).unwrap_err();
        assert!(e.to_string().contains("multiple of the block size"), "{e}");
    }
}
