//! Q4_K against activations quantized to 8 bits, llama.cpp's choice (its Q8_K): integer dot products.
//!
//! Each 256 values of a row of x become `dx * qx` with `dx = max |x| / 127` and `qx` = the nearest integer in
//! -127..=127, plus the sum of `qx` per 32. A Q4_K block then contributes
//! `d dx sum_j sc_j (q_j . qx_j) - dmin dx sum_j mn_j sum(qx_j)`, where every dot product of 4-bit weights with
//! 8-bit values is exact in i32 (AVX2: `maddubs` multiplies 32 pairs into sixteen i16 sums at most 3810, `madd`
//! scales them into i32). That is about a fifth of the instructions of expanding to f32, at the price of the
//! rounding of x: each product is off by at most `dx / 2 * sum |w|` per block (see `docs/architecture.md` for the
//! measured size). [`super::matmul_t`] stays exact; this one is for decoding speed.

use super::{Isa, QK_K, ROWS, SendPtr, check, isa, scale_min};
use crate::error::{CageError, Result};
use crate::model::gguf::GgmlType;
use rayon::prelude::*;
use std::cell::RefCell;

/// Rows of x in 8 bits: per 256 values a scale, per value an i8, per 32 the sum of the i8.
#[derive(Default)]
struct Q8Rows {
    q: Vec<i8>,
    d: Vec<f32>,
    sums: Vec<i32>,
}

impl Q8Rows {
    /// Quantizes `m` rows of `k` values (k a multiple of 256), reusing the buffers.
    fn quantize(&mut self, x: &[f32], m: usize, k: usize) {
        self.q.resize(m * k, 0);
        self.d.resize(m * k / QK_K, 0.0);
        self.sums.resize(m * k / 32, 0);
        for (b, xb) in x[..m * k].chunks_exact(QK_K).enumerate() {
            let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
            let (d, id) = if amax > 0.0 { (amax / 127.0, 127.0 / amax) } else { (0.0, 0.0) };
            self.d[b] = d;
            let qb = &mut self.q[b * QK_K..(b + 1) * QK_K];
            for (q, &v) in qb.iter_mut().zip(xb) {
                *q = (v * id).round().clamp(-127.0, 127.0) as i8;
            }
            for (j, s) in self.sums[b * 8..(b + 1) * 8].iter_mut().enumerate() {
                *s = qb[32 * j..32 * j + 32].iter().map(|&q| q as i32).sum();
            }
        }
    }
}

thread_local! {
    /// The quantized activations of the calling thread's last product, kept to spare an allocation per call.
    static ROWS_Q8: RefCell<Q8Rows> = RefCell::new(Q8Rows::default());
}

/// `out[m x n] (+)= alpha * x[m x k] * W^T` for a Q4_K matrix `raw` (`[n, k]`, rows of blocks), with x quantized
/// to 8 bits per 256 values as llama.cpp does (module doc). Other types are an error naming them.
#[allow(clippy::too_many_arguments)]
pub fn matmul_t_q8k(
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
    matmul_t_q8k_on(isa(), ty, raw, x, m, k, n, out, accumulate, alpha)
}

#[allow(clippy::too_many_arguments)]
pub(super) fn matmul_t_q8k_on(
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
    if ty != GgmlType::Q4K {
        return Err(CageError::InvalidArgument(format!(
            "K-quant matmul with 8-bit activations: {ty:?} is not supported (Q4_K only; use kquant::matmul_t)"
        )));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    let out = SendPtr(out.as_mut_ptr());
    let run = |xq: &Q8Rows| {
        (0..n.div_ceil(ROWS)).into_par_iter().for_each(|c| {
            for o in c * ROWS..((c + 1) * ROWS).min(n) {
                let w = &raw[o * (k / QK_K) * bytes..(o + 1) * (k / QK_K) * bytes];
                for r in 0..m {
                    let v = match isa {
                        // SAFETY: the CPU supports AVX2 and FMA (detected); w holds k / 256 blocks, xq k values.
                        #[cfg(target_arch = "x86_64")]
                        Isa::Avx2 => unsafe { dot_avx2(w, xq, r, k) },
                        Isa::Portable => dot(w, xq, r, k),
                    };
                    // SAFETY: each (r, o) is written by exactly one task; out holds m * n floats (checked).
                    unsafe {
                        let p = out.ptr().add(r * n + o);
                        *p = if accumulate { *p + alpha * v } else { alpha * v };
                    }
                }
            }
        })
    };
    // A nested call on this thread (rayon runs other tasks while it waits) finds the buffer taken: it then
    // quantizes into a buffer of its own.
    ROWS_Q8.with(|cell| match cell.try_borrow_mut() {
        Ok(mut xq) => {
            xq.quantize(x, m, k);
            run(&xq)
        }
        Err(_) => {
            let mut xq = Q8Rows::default();
            xq.quantize(x, m, k);
            run(&xq)
        }
    });
    Ok(())
}

/// One Q4_K row `w` against quantized row `r` (portable).
fn dot(w: &[u8], xq: &Q8Rows, r: usize, k: usize) -> f32 {
    let nb = k / QK_K;
    let mut total = 0f32;
    for (b, blk) in w.chunks_exact(144).enumerate() {
        let at = r * nb + b;
        let (d, dmin) = (super::f16_at(blk, 0), super::f16_at(blk, 2));
        let qx = &xq.q[at * QK_K..(at + 1) * QK_K];
        let (mut dots, mut mins) = (0i32, 0i32);
        for j in 0..8 {
            let (sc, mn) = scale_min(&blk[4..16], j);
            let nib = &blk[16 + 32 * (j / 2)..16 + 32 * (j / 2) + 32];
            let s: i32 = nib
                .iter()
                .zip(&qx[32 * j..32 * j + 32])
                .map(|(&q, &v)| ((q >> (4 * (j % 2))) & 15) as i32 * v as i32)
                .sum();
            dots += sc as i32 * s;
            mins += mn as i32 * xq.sums[at * 8 + j];
        }
        total += d * xq.d[at] * dots as f32 - dmin * xq.d[at] * mins as f32;
    }
    total
}

/// [`dot`] with AVX2: per pair of sub-blocks one 32-byte load of nibbles, two `maddubs` and two `madd`.
///
/// # Safety
/// The CPU must support AVX2 and FMA; `w` must hold `k / 256` Q4_K blocks and `xq` rows of `k` values up to `r`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(w: &[u8], xq: &Q8Rows, r: usize, k: usize) -> f32 {
    use std::arch::x86_64::*;
    let nb = k / QK_K;
    let low4 = _mm256_set1_epi8(0x0f);
    let mut acc = _mm256_setzero_ps();
    let mut mins_f = 0f32;
    for (b, blk) in w.chunks_exact(144).enumerate() {
        let at = r * nb + b;
        for line in 0..3 {
            _mm_prefetch::<_MM_HINT_T0>(blk.as_ptr().wrapping_add(super::PREFETCH + 64 * line).cast());
        }
        let (d, dmin) = (super::f16_at(blk, 0), super::f16_at(blk, 2));
        let qx = xq.q[at * QK_K..(at + 1) * QK_K].as_ptr();
        let mut iacc = _mm256_setzero_si256();
        let mut mins = 0i32;
        for p in 0..4 {
            let (s0, m0) = scale_min(&blk[4..16], 2 * p);
            let (s1, m1) = scale_min(&blk[4..16], 2 * p + 1);
            mins += m0 as i32 * xq.sums[at * 8 + 2 * p] + m1 as i32 * xq.sums[at * 8 + 2 * p + 1];
            // SAFETY: the block's nibbles are bytes 16..144 of blk; qx holds 256 values.
            let (q, x0, x1) = unsafe {
                (
                    _mm256_loadu_si256(blk.as_ptr().add(16 + 32 * p).cast()),
                    _mm256_loadu_si256(qx.add(64 * p).cast()),
                    _mm256_loadu_si256(qx.add(64 * p + 32).cast()),
                )
            };
            let lo = _mm256_and_si256(q, low4);
            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q), low4);
            let p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, x0), _mm256_set1_epi16(s0 as i16));
            let p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, x1), _mm256_set1_epi16(s1 as i16));
            iacc = _mm256_add_epi32(iacc, _mm256_add_epi32(p0, p1));
        }
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc), _mm256_set1_ps(d * xq.d[at]), acc);
        mins_f += dmin * xq.d[at] * mins as f32;
    }
    crate::model::linalg::hsum8(acc) - mins_f
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The portable and AVX2 kernels do the same integer sums; only the f32 summation of the blocks differs.
    #[test]
    fn kernels_agree() {
        let mut isas = vec![Isa::Portable];
        #[cfg(target_arch = "x86_64")]
        if isa() == Isa::Avx2 {
            isas.push(Isa::Avx2);
        }
        let (n, k, m) = (19, 3 * QK_K, 3);
        let mut s = 0x2545_f491_4f6c_dd1du64;
        let mut raw: Vec<u8> = (0..n * 3 * 144)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 24) as u8
            })
            .collect();
        for b in raw.chunks_exact_mut(144) {
            b[1] &= 0x3b;
            b[3] &= 0x3b;
        }
        let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.731).sin()).collect();
        let outs: Vec<Vec<f32>> = isas
            .iter()
            .map(|&isa| {
                let mut o = vec![0f32; m * n];
                matmul_t_q8k_on(isa, GgmlType::Q4K, &raw, &x, m, k, n, &mut o, false, 1.0).unwrap();
                o
            })
            .collect();
        for o in &outs[1..] {
            for (a, b) in o.iter().zip(&outs[0]) {
                assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{a} vs {b}");
            }
        }
    }
}
