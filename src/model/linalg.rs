//! The dense kernels of the CPU forward pass: `y = x W^T` on all cores, RMSNorm, SiLU.

use gemm::{Parallelism, gemm};
use rayon::prelude::*;

/// Rows of `x` up to which the hand-written kernel is used: at decode sizes the product is bound by reading
/// `W` once, and streaming every weight row against all inputs beats a packing GEMM.
const SMALL_M: usize = 8;

/// `out[m x n] (+)= alpha * x[m x k] * W^T`, with `W` stored `[n x k]` row-major (PyTorch's Linear layout).
/// With `accumulate` the product is added to `out`.
#[allow(clippy::too_many_arguments)]
pub fn matmul_t(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, out: &mut [f32], accumulate: bool, alpha: f32) {
    assert!(x.len() >= m * k && w.len() >= n * k && out.len() >= m * n, "matmul_t: buffers smaller than the shapes");
    if m == 0 || n == 0 {
        return;
    }
    if m <= SMALL_M {
        small_m(x, m, k, w, n, out, accumulate, alpha);
        return;
    }
    let par = if m * n * k >= 1 << 16 { Parallelism::Rayon(0) } else { Parallelism::None };
    // SAFETY: the assert above guarantees the pointers cover m*k, n*k and m*n floats; the strides describe
    // row-major x and out and the transpose of row-major W.
    unsafe {
        gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            1.0,
            alpha,
            false,
            false,
            false,
            par,
        );
    }
}

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    // 16 independent lanes so the compiler vectorizes without reassociating one sum.
    let mut acc = [0f32; 16];
    let ca = a.chunks_exact(16);
    let cb = b.chunks_exact(16);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = 0f32;
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    let mut h = [0f32; 8];
    for i in 0..8 {
        h[i] = acc[i] + acc[i + 8];
    }
    s + ((h[0] + h[4]) + (h[1] + h[5])) + ((h[2] + h[6]) + (h[3] + h[7]))
}

#[allow(clippy::too_many_arguments)]
fn small_m(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, out: &mut [f32], accumulate: bool, alpha: f32) {
    // Split the output columns (weight rows) across threads; each weight row is read once for all m inputs.
    const BLOCK: usize = 64;
    let nblocks = n.div_ceil(BLOCK);
    let out_ptr = SendPtr(out.as_mut_ptr());
    #[cfg(target_arch = "x86_64")]
    let fast = std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") && k >= 8;
    #[cfg(not(target_arch = "x86_64"))]
    let fast = false;
    let work = |b: usize| {
        let op = &out_ptr;
        let lo = b * BLOCK;
        let hi = (lo + BLOCK).min(n);
        #[cfg(target_arch = "x86_64")]
        if fast {
            let mut r0 = 0;
            while r0 < m {
                // SAFETY: AVX2 and FMA were detected; rows r0..r0 + R of x, rows lo..hi of w and their outputs
                // lie inside the asserted shapes.
                unsafe {
                    match m - r0 {
                        1 => tile_avx2::<1>(x, r0, k, w, lo..hi, n, op, accumulate, alpha),
                        2 => tile_avx2::<2>(x, r0, k, w, lo..hi, n, op, accumulate, alpha),
                        3 => tile_avx2::<3>(x, r0, k, w, lo..hi, n, op, accumulate, alpha),
                        _ => tile_avx2::<4>(x, r0, k, w, lo..hi, n, op, accumulate, alpha),
                    }
                }
                r0 += 4;
            }
            return;
        }
        let _ = fast;
        for o in lo..hi {
            let wr = &w[o * k..(o + 1) * k];
            for r in 0..m {
                let v = alpha * dot(wr, &x[r * k..(r + 1) * k]);
                // SAFETY: each (r, o) is written by exactly one block; out holds m*n floats (asserted).
                unsafe {
                    let p = op.0.add(r * n + o);
                    *p = if accumulate { *p + v } else { v };
                }
            }
        }
    };
    if n * k * m >= 1 << 15 {
        (0..nblocks).into_par_iter().for_each(work);
    } else {
        (0..nblocks).for_each(work);
    }
}

/// The sum of the eight lanes of `v` (halves, then pairs, then the last two): the one horizontal sum of the
/// AVX2 matmul kernels (here, packed, weight_kernels, kquant), so that they all round alike.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
pub(crate) fn hsum8(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    let h = _mm_add_ss(h, _mm_movehdup_ps(h));
    _mm_cvtss_f32(h)
}

/// Rows `r0 .. r0 + R` of x against weight rows `rows`, with AVX2 and FMA: each 8-wide slice of a weight row is
/// loaded once and multiplied into every row of x, so extra rows cost fused multiply-adds, not weight reads.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_avx2<const R: usize>(
    x: &[f32],
    r0: usize,
    k: usize,
    w: &[f32],
    rows: std::ops::Range<usize>,
    n: usize,
    out: &SendPtr,
    accumulate: bool,
    alpha: f32,
) {
    use std::arch::x86_64::*;
    let k8 = k - k % 8;
    // SAFETY: the caller guarantees x holds rows r0..r0 + R of k floats, w the rows `rows`, and out m*n floats;
    // all loads are unaligned and below k8 <= k.
    unsafe {
        for o in rows {
            let wr = w.as_ptr().add(o * k);
            let mut acc = [[_mm256_setzero_ps(); 2]; R];
            for c in 0..k8 / 8 {
                let wv = _mm256_loadu_ps(wr.add(c * 8));
                for (r, a) in acc.iter_mut().enumerate() {
                    let xv = _mm256_loadu_ps(x.as_ptr().add((r0 + r) * k + c * 8));
                    a[c % 2] = _mm256_fmadd_ps(wv, xv, a[c % 2]);
                }
            }
            for (r, a) in acc.iter().enumerate() {
                let h = hsum8(_mm256_add_ps(a[0], a[1]));
                let xr = &x[(r0 + r) * k..(r0 + r + 1) * k];
                let tail: f32 = xr[k8..].iter().zip(&w[o * k + k8..(o + 1) * k]).map(|(a, b)| a * b).sum();
                let v = alpha * (h + tail);
                let p = out.0.add((r0 + r) * n + o);
                *p = if accumulate { *p + v } else { v };
            }
        }
    }
}

/// An output pointer shared by the threads of the CPU matmul kernels (here, `packed`, `weight_kernels`,
/// `kquant`), each of which writes its own disjoint elements.
pub(super) struct SendPtr(pub(super) *mut f32);
// SAFETY: used only to write disjoint elements from different threads.
unsafe impl Sync for SendPtr {}
// SAFETY: as above.
unsafe impl Send for SendPtr {}

/// RMSNorm of each `w.len()`-wide row of `x` into `out`: `w * (x / sqrt(mean(x^2) + eps))`, as transformers
/// does it.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let ms = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for ((o, &v), &g) in or.iter_mut().zip(xr).zip(w) {
            *o = g * (v * inv);
        }
    }
}

/// `gate <- silu(gate) * up`. It runs on one thread between two parallel matmuls, once per layer over every
/// row of the batch, so it is vectorized: with the scalar `exp` it took a few percent of a decode step and
/// grew with each row.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports AVX2 and FMA (just checked).
        unsafe { silu_mul_avx2(gate, up) };
        return;
    }
    silu_mul_body(gate, up)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn silu_mul_avx2(gate: &mut [f32], up: &[f32]) {
    silu_mul_body(gate, up)
}

#[inline(always)]
fn silu_mul_body(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + exp_f32(-*g)) * u;
    }
}

/// `e^x` in straight-line f32 arithmetic that vectorizes (Cephes `expf`: x = n ln 2 + r, a degree-7 polynomial
/// in r, 2^n built in the exponent bits), within 2 ulp of `f32::exp` for x in [-87, 88]; outside, x is
/// clamped there (e^x then underflows to ~1e-38 or reaches ~1.7e38, which SiLU turns into 0 or x exactly).
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    // Round to nearest by adding and removing 1.5 * 2^23 (|x log2 e| < 2^22); Rust does not reassociate. The
    // sum's bits are those of 1.5 * 2^23 plus n, which gives n as an integer without a (scalar, saturating)
    // float-to-int conversion.
    let t = x * std::f32::consts::LOG2_E + 12_582_912.0;
    let n = t - 12_582_912.0;
    let ni = t.to_bits().wrapping_sub(0x4B40_0000) as i32;
    // ln 2 in two parts so that n * C1 is exact.
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let p =
        ((((1.987_569_1e-4 * r + 1.398_2e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 0.166_666_65) * r + 0.5;
    let y = p * (r * r) + r + 1.0;
    y * f32::from_bits(((ni + 127) as u32) << 23)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
        let mut o = vec![0f32; m * n];
        for r in 0..m {
            for c in 0..n {
                o[r * n + c] = (0..k).map(|i| x[r * k + i] as f64 * w[c * k + i] as f64).sum::<f64>() as f32;
            }
        }
        o
    }

    #[test]
    fn vector_exp_is_within_two_ulp_of_std_and_silu_saturates() {
        let mut worst = 0f32;
        for i in -86_999..=88_000 {
            let x = i as f32 * 1e-3 - 1.7e-4;
            let (a, b) = (exp_f32(x), x.exp());
            worst = worst.max((a - b).abs() / b);
        }
        assert!(worst < 2.5e-7, "relative error {worst}");
        let mut g = vec![-200.0, -90.0, -1.0, 0.0, 1.0, 90.0, 200.0];
        let want: Vec<f32> = g.iter().map(|&x: &f32| x / (1.0 + (-x).exp()) * 2.0).collect();
        silu_mul(&mut g, &[2.0; 7]);
        for (a, b) in g.iter().zip(&want) {
            assert!((a - b).abs() <= 1e-6 * b.abs() + 1e-30, "{a} vs {b}");
        }
    }

    #[test]
    fn both_kernels_match_naive_product() {
        // Every tile height of the small-m kernel (1 to 4 rows, then tiles of 4), with and without a k % 8 tail.
        for &(m, k, n) in
            &[(1, 37, 70), (2, 8, 5), (3, 19, 33), (4, 100, 65), (5, 64, 130), (8, 64, 70), (9, 33, 17), (40, 96, 200)]
        {
            let x: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32 - 6.0) / 5.0).collect();
            let w: Vec<f32> = (0..n * k).map(|i| ((i * 5 % 11) as f32 - 5.0) / 3.0).collect();
            let want = naive(&x, m, k, &w, n);
            let mut got = vec![1f32; m * n];
            matmul_t(&x, m, k, &w, n, &mut got, true, 2.0);
            for (g, w) in got.iter().zip(&want) {
                assert!((g - (1.0 + 2.0 * w)).abs() < 1e-3, "m={m}: {g} vs {}", 1.0 + 2.0 * w);
            }
        }
    }
}
