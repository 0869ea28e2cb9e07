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

/// `log sum exp(z)` in `f64`.
pub fn logsumexp<T: Real>(z: &[T]) -> f64 {
    let m = max(z).f64();
    if m == f64::NEG_INFINITY {
        return m;
    }
    m + z.iter().map(|x| (x.f64() - m).exp()).sum::<f64>().ln()
}
