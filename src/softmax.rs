//! Softmax helpers shared by the solvers and baselines. Sums accumulate in `f64` in eight independent lanes:
//! that keeps 100k-long `f32` sums accurate and lets the compiler vectorise the loops.

use crate::real::Real;

/// Maximum of a slice (`-inf` for an empty or all `-inf` slice), vectorisable.
#[inline]
pub fn max<T: Real>(xs: &[T]) -> T {
    let mut acc = [T::neg_infinity(); 8];
    let mut chunks = xs.chunks_exact(8);
    for c in &mut chunks {
        for l in 0..8 {
            acc[l] = if c[l] > acc[l] { c[l] } else { acc[l] };
        }
    }
    let mut m = acc.iter().copied().fold(T::neg_infinity(), |a, b| if b > a { b } else { a });
    for &x in chunks.remainder() {
        if x > m {
            m = x;
        }
    }
    m
}

/// Sum of `f(i)` for `i in 0..n` in eight `f64` lanes.
#[inline(always)]
pub fn sum_lanes(n: usize, mut f: impl FnMut(usize) -> f64) -> f64 {
    let mut acc = [0.0f64; 8];
    let full = n / 8 * 8;
    let mut i = 0;
    while i < full {
        for (l, a) in acc.iter_mut().enumerate() {
            *a += f(i + l);
        }
        i += 8;
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for k in full..n {
        s += f(k);
    }
    s
}

/// Replaces `z` by `exp(z - max z)` and returns the sum of the new entries (>= 1 for a row with a finite entry).
#[inline]
pub fn exp_shifted<T: Real>(z: &mut [T]) -> f64 {
    let m = max(z);
    for x in z.iter_mut() {
        *x = (*x - m).exp();
    }
    sum_lanes(z.len(), |i| z[i].f64())
}

/// In-place softmax of `z` (entries of `-inf` become 0). `z` must hold a finite entry.
pub fn softmax_in_place<T: Real>(z: &mut [T]) {
    let s = exp_shifted(z);
    let inv = T::of(1.0 / s);
    for x in z.iter_mut() {
        *x = *x * inv;
    }
}

/// `log sum exp(z)` in `f64`.
pub fn logsumexp<T: Real>(z: &[T]) -> f64 {
    let m = max(z).f64();
    if m == f64::NEG_INFINITY {
        return m;
    }
    m + sum_lanes(z.len(), |i| (z[i].f64() - m).exp()).ln()
}
