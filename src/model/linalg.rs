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
                let s = _mm256_add_ps(a[0], a[1]);
                let h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s));
                let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
                let h = _mm_add_ss(h, _mm_movehdup_ps(h));
                let xr = &x[(r0 + r) * k..(r0 + r + 1) * k];
                let tail: f32 = xr[k8..].iter().zip(&w[o * k + k8..(o + 1) * k]).map(|(a, b)| a * b).sum();
                let v = alpha * (_mm_cvtss_f32(h) + tail);
                let p = out.0.add((r0 + r) * n + o);
                *p = if accumulate { *p + v } else { v };
            }
        }
    }
}

struct SendPtr(*mut f32);
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

/// `gate <- silu(gate) * up`.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
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
