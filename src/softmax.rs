//! Vectorisable row primitives shared by the solvers and baselines: max, shifted exp with its sum, and
//! blocked reductions. Sums run in eight lanes of the working precision within blocks of 512 elements and
//! in `f64` across blocks: the compiler vectorises the lanes, and a 128k-long `f32` sum keeps ~7 digits.

use crate::real::Real;

const LANES: usize = 8;
/// Elements per block of the blocked reductions (f32: 2 KiB a row, so a few rows fit in L1).
pub const BLOCK: usize = 512;

/// Maximum of a slice (`-inf` for an empty or all `-inf` slice), vectorisable.
#[inline(always)]
pub fn max<T: Real>(xs: &[T]) -> T {
    let mut acc = [T::neg_infinity(); LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            acc[l] = if c[l] > acc[l] { c[l] } else { acc[l] };
        }
    }
    let mut m = T::neg_infinity();
    for &x in acc.iter().chain(rest) {
        m = if x > m { x } else { m };
    }
    m
}

/// Sum over `i` of `f(a[i], b[i], c[i])`, in blocks (see the module comment).
#[inline(always)]
pub fn reduce3<T: Real>(a: &[T], b: &[T], c: &[T], f: impl Fn(T, T, T) -> T) -> f64 {
    let mut total = 0.0f64;
    for ((ab, bb), cb) in a.chunks(BLOCK).zip(b.chunks(BLOCK)).zip(c.chunks(BLOCK)) {
        let mut acc = [T::zero(); LANES];
        let (ac, bc, cc) = (ab.chunks_exact(LANES), bb.chunks_exact(LANES), cb.chunks_exact(LANES));
        let (ar, br, cr) = (ac.remainder(), bc.remainder(), cc.remainder());
        for ((x, y), z) in ac.zip(bc).zip(cc) {
            for l in 0..LANES {
                acc[l] = acc[l] + f(x[l], y[l], z[l]);
            }
        }
        let mut s = acc.iter().fold(0.0f64, |s, v| s + v.f64());
        for ((x, y), z) in ar.iter().zip(br).zip(cr) {
            s += f(*x, *y, *z).f64();
        }
        total += s;
    }
    total
}

/// Sum over `i` of `f(a[i], b[i])`.
#[inline(always)]
pub fn reduce2<T: Real>(a: &[T], b: &[T], f: impl Fn(T, T) -> T) -> f64 {
    reduce3(a, b, b, |x, y, _| f(x, y))
}

/// Sum of a slice.
#[inline(always)]
pub fn sum<T: Real>(a: &[T]) -> f64 {
    reduce3(a, a, a, |x, _, _| x)
}

/// Replaces `z` by `exp(z - max z)` and returns the sum of the new entries (>= 1 for a row with a finite entry).
#[inline(always)]
pub fn exp_shifted<T: Real>(z: &mut [T]) -> f64 {
    let m = max(z);
    for x in z.iter_mut() {
        *x = (*x - m).exp_nonpos();
    }
    sum(z)
}

/// In-place softmax of `z` (entries of `-inf` become 0). `z` must hold a finite entry.
pub fn softmax_in_place<T: Real>(z: &mut [T]) {
    let s = exp_shifted(z);
    let inv = T::of(1.0 / s);
    for x in z.iter_mut() {
        *x = *x * inv;
    }
}

/// `log sum exp(z)` in `f64`: `-inf` for an empty or all `-inf` row, NaN when the row holds a NaN or `+inf`.
/// Two vectorised passes (max, then the shifted exponentials summed in `f64` lanes); the exponentials are
/// [`Real::exp_nonpos`] in `f64` (relative error < 1e-15), so the result is as accurate as a sequential sum of
/// `f64::exp`. It runs on every stream's full row at every decoding step.
pub fn logsumexp<T: Real>(z: &[T]) -> f64 {
    if let Some(z) = as_f32(z) {
        return logsumexp_f32(z);
    }
    let m = max(z).f64();
    if m == f64::NEG_INFINITY {
        return m;
    }
    if m == f64::INFINITY || z.iter().any(|x| x.is_nan()) {
        return f64::NAN;
    }
    m + sum_exp_from(z, m).ln()
}

/// The slice as `f32` when `T` is `f32` (the type every model runtime hands out), for the explicit SIMD paths.
#[inline(always)]
pub(crate) fn as_f32<T: Real>(z: &[T]) -> Option<&[f32]> {
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>())
        // SAFETY: T is f32 (same type id), so the cast is the identity.
        .then(|| unsafe { std::slice::from_raw_parts(z.as_ptr().cast::<f32>(), z.len()) })
}

fn logsumexp_f32(z: &[f32]) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (just checked).
        let (m, nan) = unsafe { max_nan_avx2(z) };
        if m == f32::NEG_INFINITY {
            return f64::NEG_INFINITY;
        }
        if nan || m == f32::INFINITY {
            return f64::NAN;
        }
        let m = m as f64;
        return m + sum_exp_from(z, m).ln();
    }
    let m = max(z) as f64;
    if m == f64::NEG_INFINITY {
        return m;
    }
    if m == f64::INFINITY || z.iter().any(|x| x.is_nan()) {
        return f64::NAN;
    }
    m + sum_exp_from(z, m).ln()
}

/// Whether the explicit AVX2 + FMA kernels can run (cached by the standard library after the first call).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn avx2_fma() -> bool {
    std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
}

#[cfg(not(target_arch = "x86_64"))]
#[inline(always)]
pub(crate) fn avx2_fma() -> bool {
    false
}

/// `sum_i exp(z_i - m)` in `f64` for `m >= max z` (finite, no NaN in `z`); `-inf` entries add 0.
pub(crate) fn sum_exp_from<T: Real>(z: &[T], m: f64) -> f64 {
    if let Some(z) = as_f32(z) {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports AVX-512F and FMA (just checked).
            return unsafe { sum_exp_from_avx512(z, m) };
        }
        #[cfg(target_arch = "x86_64")]
        if avx2_fma() {
            // SAFETY: the CPU supports AVX2 and FMA (just checked).
            return unsafe { sum_exp_from_avx2(z, m) };
        }
        return reduce_exp(z, m);
    }
    reduce_exp(z, m)
}

/// The portable sum of [`sum_exp_from`]: eight `f64` lanes that the compiler may vectorise.
#[inline(always)]
fn reduce_exp<T: Real>(z: &[T], m: f64) -> f64 {
    let mut acc = [0f64; LANES];
    let chunks = z.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            acc[l] += (c[l].f64() - m).exp_nonpos();
        }
    }
    let tail: f64 = rest.iter().map(|x| (x.f64() - m).exp_nonpos()).sum();
    acc.iter().sum::<f64>() + tail
}

/// Maximum of an `f32` row and whether it holds a NaN (NaNs do not take part in the maximum), with AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn max_nan_avx2(z: &[f32]) -> (f32, bool) {
    use std::arch::x86_64::*;
    let n32 = z.len() / 32 * 32;
    let p = z.as_ptr();
    let mut m = f32::NEG_INFINITY;
    let mut nan = false;
    // SAFETY: every load reads 8 floats below n32 <= z.len(); unaligned loads only.
    unsafe {
        let mut acc = [_mm256_set1_ps(f32::NEG_INFINITY); 4];
        let mut un = _mm256_setzero_ps();
        for i in (0..n32).step_by(32) {
            for (j, a) in acc.iter_mut().enumerate() {
                let v = _mm256_loadu_ps(p.add(i + 8 * j));
                // maxps returns its second operand when either is NaN: NaNs never enter the maximum.
                *a = _mm256_max_ps(v, *a);
                un = _mm256_or_ps(un, _mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
            }
        }
        let a = _mm256_max_ps(_mm256_max_ps(acc[0], acc[1]), _mm256_max_ps(acc[2], acc[3]));
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), a);
        for x in lanes.iter().chain(&z[n32..]) {
            m = if *x > m { *x } else { m };
        }
        nan |= _mm256_movemask_ps(un) != 0;
    }
    (m, nan || z[n32..].iter().any(|x| x.is_nan()))
}

/// [`sum_exp_from`] for an `f32` row with AVX2 and FMA: [`Real::exp_nonpos`] for `f64` in four-lane registers,
/// sixteen entries per iteration in four independent accumulators.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn sum_exp_from_avx2(z: &[f32], m: f64) -> f64 {
    use crate::real::exp64::*;
    use std::arch::x86_64::*;
    #[inline(always)]
    unsafe fn exp4(d: __m256d) -> __m256d {
        // SAFETY: register arithmetic only; the caller enables AVX2 and FMA.
        unsafe {
            let x = _mm256_max_pd(d, _mm256_set1_pd(LO));
            let k = _mm256_fmadd_pd(x, _mm256_set1_pd(std::f64::consts::LOG2_E), _mm256_set1_pd(ROUND));
            let n = _mm256_sub_pd(k, _mm256_set1_pd(ROUND));
            let r = _mm256_fnmadd_pd(n, _mm256_set1_pd(LN2_HI), x);
            let r = _mm256_fnmadd_pd(n, _mm256_set1_pd(LN2_LO), r);
            // Taylor series to degree 12 on [-ln2/2, ln2/2] (as `exp_nonpos`).
            let mut p = _mm256_set1_pd(TAYLOR[0]);
            for &c in &TAYLOR[1..] {
                p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(c));
            }
            let e = _mm256_slli_epi64::<52>(_mm256_add_epi64(_mm256_castpd_si256(k), _mm256_set1_epi64x(1023)));
            let y = _mm256_mul_pd(p, _mm256_castsi256_pd(e));
            // Exactly 0 at and below the underflow threshold (and for -inf).
            _mm256_and_pd(y, _mm256_cmp_pd::<_CMP_GT_OQ>(d, _mm256_set1_pd(LO)))
        }
    }
    let n16 = z.len() / 16 * 16;
    let p = z.as_ptr();
    // SAFETY: every load reads 8 floats below n16 <= z.len(); unaligned loads only.
    unsafe {
        let mv = _mm256_set1_pd(m);
        let mut acc = [_mm256_setzero_pd(); 4];
        for i in (0..n16).step_by(16) {
            let a = _mm256_loadu_ps(p.add(i));
            let b = _mm256_loadu_ps(p.add(i + 8));
            let h = [
                _mm256_castps256_ps128(a),
                _mm256_extractf128_ps::<1>(a),
                _mm256_castps256_ps128(b),
                _mm256_extractf128_ps::<1>(b),
            ];
            for (j, hj) in h.iter().enumerate() {
                acc[j] = _mm256_add_pd(acc[j], exp4(_mm256_sub_pd(_mm256_cvtps_pd(*hj), mv)));
            }
        }
        let s = _mm256_add_pd(_mm256_add_pd(acc[0], acc[1]), _mm256_add_pd(acc[2], acc[3]));
        let mut lanes = [0f64; 4];
        _mm256_storeu_pd(lanes.as_mut_ptr(), s);
        let tail: f64 = z[n16..].iter().map(|&x| (x as f64 - m).exp_nonpos()).sum();
        (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]) + tail
    }
}

/// [`sum_exp_from_avx2`] in eight-lane registers: half the instructions per entry where the CPU has AVX-512.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
pub(crate) unsafe fn sum_exp_from_avx512(z: &[f32], m: f64) -> f64 {
    use crate::real::exp64::*;
    use std::arch::x86_64::*;
    #[inline(always)]
    unsafe fn exp8(d: __m512d) -> __m512d {
        // SAFETY: register arithmetic only; the caller enables AVX-512F and FMA.
        unsafe {
            let x = _mm512_max_pd(d, _mm512_set1_pd(LO));
            let k = _mm512_fmadd_pd(x, _mm512_set1_pd(std::f64::consts::LOG2_E), _mm512_set1_pd(ROUND));
            let n = _mm512_sub_pd(k, _mm512_set1_pd(ROUND));
            let r = _mm512_fnmadd_pd(n, _mm512_set1_pd(LN2_HI), x);
            let r = _mm512_fnmadd_pd(n, _mm512_set1_pd(LN2_LO), r);
            let mut p = _mm512_set1_pd(TAYLOR[0]);
            for &c in &TAYLOR[1..] {
                p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(c));
            }
            let e = _mm512_slli_epi64::<52>(_mm512_add_epi64(_mm512_castpd_si512(k), _mm512_set1_epi64(1023)));
            let y = _mm512_mul_pd(p, _mm512_castsi512_pd(e));
            _mm512_maskz_mov_pd(_mm512_cmp_pd_mask::<_CMP_GT_OQ>(d, _mm512_set1_pd(LO)), y)
        }
    }
    let n32 = z.len() / 32 * 32;
    let p = z.as_ptr();
    // SAFETY: every load reads 8 floats below n32 <= z.len(); unaligned loads only.
    unsafe {
        let mv = _mm512_set1_pd(m);
        let mut acc = [_mm512_setzero_pd(); 4];
        for i in (0..n32).step_by(32) {
            for (j, a) in acc.iter_mut().enumerate() {
                let h = _mm256_loadu_ps(p.add(i + 8 * j));
                *a = _mm512_add_pd(*a, exp8(_mm512_sub_pd(_mm512_cvtps_pd(h), mv)));
            }
        }
        let s = _mm512_add_pd(_mm512_add_pd(acc[0], acc[1]), _mm512_add_pd(acc[2], acc[3]));
        let tail: f64 = z[n32..].iter().map(|&x| (x as f64 - m).exp_nonpos()).sum();
        _mm512_reduce_add_pd(s) + tail
    }
}
