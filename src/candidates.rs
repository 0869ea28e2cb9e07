//! Candidate selection from a full vocabulary row: the paper's top-k of the base model (k = 50), or every token.

use crate::error::{CageError, Result};
use crate::real::Real;
#[cfg(target_arch = "x86_64")]
use crate::softmax::{as_f32, avx2_fma, max_nan_avx2};
use crate::softmax::{max, sum_exp_from};

/// Which candidates a decoding step plays the game over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Selection {
    /// The k most likely tokens of the base model (ties broken by the lower token id).
    TopK(usize),
    /// The whole vocabulary (the k = V case).
    All,
}

/// The chosen token ids and the base log-probabilities (log-softmax over the full row) at those ids.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidates<T> {
    /// Token ids, most likely first (for `All`: in id order).
    pub ids: Vec<u32>,
    /// log pi0 at `ids` (normalised over the full vocabulary).
    pub base_logprobs: Vec<T>,
}

/// Selects candidates from a row of base logits (or log-probabilities) of length V.
///
/// Top-k keeps the k best entries seen so far above a running threshold in one scan, so almost every entry
/// costs a compare against the k-th best (explicit AVX2 for `f32` rows); the log-normaliser is then one
/// vectorised pass ([`crate::softmax::logsumexp`]'s kernels). Errors, in this order: a NaN or `+inf` logit
/// (the first one), no finite logit, `k = 0`.
pub fn select<T: Real>(logits: &[T], selection: Selection) -> Result<Candidates<T>> {
    let n = logits.len();
    let k = match selection {
        Selection::TopK(k) if k < n => k.max(1),
        _ => 0,
    };
    // The k best ids in order, or (k = 0) nothing yet; and the row's maximum.
    let (mut ids, m) = if k > 0 { top_k(logits, k)? } else { (Vec::new(), checked_max(logits)?) };
    if m == f64::NEG_INFINITY {
        return Err(CageError::EmptyCandidates { row: 0 });
    }
    let lse = m + sum_exp_from(logits, m).ln();
    if selection == Selection::TopK(0) {
        return Err(CageError::InvalidArgument("top-k needs k >= 1".into()));
    }
    if k == 0 {
        ids = (0..n as u32).collect();
        if let Selection::TopK(_) = selection {
            // k >= V: every id, most likely first (larger logit, then smaller id).
            ids.sort_unstable_by(|a, b| logits[*b as usize].f64().total_cmp(&logits[*a as usize].f64()).then(a.cmp(b)));
        }
    }
    let base_logprobs = ids.iter().map(|&i| T::of(logits[i as usize].f64() - lse)).collect();
    Ok(Candidates { ids, base_logprobs })
}

fn non_finite<T: Real>(logits: &[T]) -> CageError {
    let (i, x) = logits
        .iter()
        .enumerate()
        .find(|(_, x)| x.is_nan() || **x == T::infinity())
        .expect("called on a row with a NaN or +inf");
    CageError::NonFinite { what: "base logits".into(), index: i, value: format!("{x}") }
}

/// The row's maximum as `f64` (`-inf` for an empty or all `-inf` row); a NaN or `+inf` is an error.
fn checked_max<T: Real>(logits: &[T]) -> Result<f64> {
    #[cfg(target_arch = "x86_64")]
    if let Some(z) = as_f32(logits)
        && avx2_fma()
    {
        // SAFETY: the CPU supports AVX2 and FMA (just checked).
        let (m, nan) = unsafe { max_nan_avx2(z) };
        return if nan || m == f32::INFINITY { Err(non_finite(logits)) } else { Ok(m as f64) };
    }
    if logits.iter().any(|x| x.is_nan() || *x == T::infinity()) {
        return Err(non_finite(logits));
    }
    Ok(max(logits).f64())
}

/// The `k` best entries so far (`0 < k`), as sortable integers: larger is better (larger logit, then smaller
/// id), so the kept set and its order are those of the total order (logit descending, id ascending).
struct Kept<E> {
    buf: Vec<E>,
    k: usize,
    /// Entries kept before the buffer is cut back to `k`.
    cap: usize,
}

/// Entries one block of the scan can add past `cap` before the cut.
const SLACK: usize = 32;

impl<E: Ord + Copy> Kept<E> {
    fn new(k: usize) -> Self {
        let cap = (4 * k).max(256);
        Kept { buf: Vec::with_capacity(cap + SLACK), k, cap }
    }

    /// Cuts the buffer back to the `k` best; returns the worst of them (the new threshold).
    fn cut(&mut self) -> E {
        let k = self.k;
        if self.buf.len() > k {
            self.buf.select_nth_unstable_by(k - 1, |a, b| b.cmp(a));
            self.buf.truncate(k);
            return self.buf[k - 1];
        }
        *self.buf.iter().min().expect("cut only a full buffer")
    }

    /// The `k` best, best first.
    fn finish(mut self) -> Vec<E> {
        if self.buf.len() > self.k {
            self.cut();
        }
        self.buf.sort_unstable_by(|a, b| b.cmp(a));
        self.buf
    }
}

/// Total-order key of an `f32` (as `f32::total_cmp`, and as `f64::total_cmp` of the widened value), unsigned.
#[inline(always)]
fn key32(x: f32) -> u32 {
    let b = x.to_bits();
    if b >> 31 == 1 { !b } else { b | 0x8000_0000 }
}

/// Total-order key of an `f64`, unsigned.
#[inline(always)]
fn key64(x: f64) -> u64 {
    let b = x.to_bits();
    if b >> 63 == 1 { !b } else { b | (1 << 63) }
}

/// The `k < V` best ids, best first, and the row's maximum.
fn top_k<T: Real>(logits: &[T], k: usize) -> Result<(Vec<u32>, f64)> {
    #[cfg(target_arch = "x86_64")]
    if let Some(z) = as_f32(logits)
        && avx2_fma()
    {
        let mut kept = Kept::<u64>::new(k);
        // SAFETY: the CPU supports AVX2 and FMA (just checked).
        if !unsafe { scan_f32_avx2(z, &mut kept) } {
            return Err(non_finite(logits));
        }
        let ids: Vec<u32> = kept.finish().iter().map(|&e| !(e as u32)).collect();
        let m = logits[ids[0] as usize].f64();
        return Ok((ids, m));
    }
    top_k_portable(logits, k)
}

/// [`top_k`] without explicit SIMD: 64-bit key of the widened value above the inverted id.
fn top_k_portable<T: Real>(logits: &[T], k: usize) -> Result<(Vec<u32>, f64)> {
    let mut kept = Kept::<u128>::new(k);
    let mut th = 0u128;
    for (i, x) in logits.iter().enumerate() {
        if x.is_nan() || *x == T::infinity() {
            return Err(non_finite(logits));
        }
        let e = ((key64(x.f64()) as u128) << 32) | (!(i as u32)) as u128;
        if e > th {
            kept.buf.push(e);
            if kept.buf.len() >= kept.cap {
                th = kept.cut();
            }
        }
    }
    let ids: Vec<u32> = kept.finish().iter().map(|&e| !(e as u32)).collect();
    let m = logits[ids[0] as usize].f64();
    Ok((ids, m))
}

/// One AVX2 pass of [`top_k`] over an `f32` row: keys eight at a time against the broadcast threshold, 32
/// entries per test, the rare entries above it pushed one by one (entry: key above the inverted id). Returns
/// false when the row holds a NaN or `+inf` (then `kept` is meaningless).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn scan_f32_avx2(z: &[f32], kept: &mut Kept<u64>) -> bool {
    use std::arch::x86_64::*;
    let entry = |i: usize| ((key32(z[i]) as u64) << 32) | (!(i as u32)) as u64;
    // Keys are compared signed (key32 with the top bit flipped): +inf is the largest non-NaN, -inf the smallest.
    let signed = |x: f32| (key32(x) ^ 0x8000_0000) as i32;
    let (pos_inf, neg_inf) = (signed(f32::INFINITY), signed(f32::NEG_INFINITY));
    let n32 = z.len() / 32 * 32;
    let p = z.as_ptr();
    let mut th = i32::MIN;
    let (mut hi, mut lo) = (i32::MIN, i32::MAX);
    // SAFETY: every load reads 8 floats below n32 <= z.len(); unaligned loads only.
    unsafe {
        let mut thv = _mm256_set1_epi32(th);
        let (mut hiv, mut lov) = (_mm256_set1_epi32(i32::MIN), _mm256_set1_epi32(i32::MAX));
        for i in (0..n32).step_by(32) {
            let mut gt = [_mm256_setzero_si256(); 4];
            for (j, g) in gt.iter_mut().enumerate() {
                let b = _mm256_loadu_si256(p.add(i + 8 * j).cast());
                // Signed total-order key: negative floats get their magnitude bits flipped.
                let key = _mm256_xor_si256(b, _mm256_srli_epi32::<1>(_mm256_srai_epi32::<31>(b)));
                hiv = _mm256_max_epi32(hiv, key);
                lov = _mm256_min_epi32(lov, key);
                *g = _mm256_cmpgt_epi32(key, thv);
            }
            let any = _mm256_or_si256(_mm256_or_si256(gt[0], gt[1]), _mm256_or_si256(gt[2], gt[3]));
            if _mm256_testz_si256(any, any) == 0 {
                for (j, g) in gt.iter().enumerate() {
                    let mut mask = _mm256_movemask_ps(_mm256_castsi256_ps(*g)) as u32;
                    while mask != 0 {
                        kept.buf.push(entry(i + 8 * j + mask.trailing_zeros() as usize));
                        mask &= mask - 1;
                    }
                }
                if kept.buf.len() >= kept.cap {
                    th = ((kept.cut() >> 32) as u32 ^ 0x8000_0000) as i32;
                    thv = _mm256_set1_epi32(th);
                }
            }
        }
        let mut lanes = [0i32; 16];
        _mm256_storeu_si256(lanes.as_mut_ptr().cast(), hiv);
        _mm256_storeu_si256(lanes.as_mut_ptr().add(8).cast(), lov);
        hi = lanes[..8].iter().copied().fold(hi, i32::max);
        lo = lanes[8..].iter().copied().fold(lo, i32::min);
    }
    for (i, &x) in z.iter().enumerate().skip(n32) {
        let s = signed(x);
        (hi, lo) = (hi.max(s), lo.min(s));
        if s > th {
            kept.buf.push(entry(i));
            if kept.buf.len() >= kept.cap {
                th = ((kept.cut() >> 32) as u32 ^ 0x8000_0000) as i32;
            }
        }
    }
    // +inf and positive NaNs sort above every finite key, negative NaNs below -inf.
    hi < pos_inf && lo >= neg_inf
}

/// Gathers a full-vocabulary row (for example a principal's token values) at the candidates' ids.
pub fn gather<T: Real>(row: &[T], ids: &[u32]) -> Result<Vec<T>> {
    ids.iter()
        .map(|&i| {
            row.get(i as usize).copied().ok_or_else(|| {
                CageError::InvalidArgument(format!("token id {i} is outside a row of {} entries", row.len()))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::softmax::logsumexp;

    /// The straightforward definition: reject NaN / +inf, normalise with a sequential f64 sum, sort every id.
    fn reference(x: &[f32], k: usize) -> std::result::Result<(Vec<u32>, f64), String> {
        if let Some(i) = x.iter().position(|v| v.is_nan() || *v == f32::INFINITY) {
            return Err(format!("non-finite at {i}"));
        }
        let m = x.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
        if m == f64::NEG_INFINITY {
            return Err("empty".into());
        }
        let lse = m + x.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
        let mut ids: Vec<u32> = (0..x.len() as u32).collect();
        ids.sort_by(|&a, &b| (x[b as usize]).total_cmp(&x[a as usize]).then(a.cmp(&b)));
        ids.truncate(k);
        Ok((ids, lse))
    }

    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            self.0 >> 33
        }
        fn unit(&mut self) -> f64 {
            self.next() as f64 / (1u64 << 31) as f64
        }
    }

    /// Rows with many exact ties, signed zeros, -inf runs and (sometimes) a NaN or +inf.
    fn row(r: &mut Lcg, n: usize, bad: bool) -> Vec<f32> {
        let mut x: Vec<f32> = (0..n)
            .map(|_| match r.next() % 10 {
                0 => f32::NEG_INFINITY,
                1 => 0.0,
                2 => -0.0,
                3 | 4 => (r.next() % 6) as f32 - 3.0,
                _ => (r.unit() * 30.0 - 20.0) as f32,
            })
            .collect();
        if bad && n > 0 {
            let i = (r.next() as usize) % n;
            x[i] = [f32::NAN, -f32::NAN, f32::INFINITY][(r.next() % 3) as usize];
        }
        x
    }

    fn check(x: &[f32], k: usize) {
        let sel = if k == 0 { Selection::All } else { Selection::TopK(k) };
        let got = select(x, sel);
        let got64 = select(&x.iter().map(|&v| v as f64).collect::<Vec<_>>(), sel);
        match reference(x, k.max(1)) {
            Err(e) if e.starts_with("non-finite at ") => {
                let i: usize = e["non-finite at ".len()..].parse().unwrap();
                for msg in [got.unwrap_err().to_string(), got64.unwrap_err().to_string()] {
                    assert!(msg.contains(&format!("index {i}:")), "{msg} vs {e}");
                }
            }
            Err(_) => assert!(matches!(got, Err(CageError::EmptyCandidates { .. })) && got64.is_err()),
            Ok((ids, lse)) => {
                let (got, got64) = (got.unwrap(), got64.unwrap());
                let want_ids: Vec<u32> = if k == 0 { (0..x.len() as u32).collect() } else { ids };
                assert_eq!(got.ids, want_ids, "n = {} k = {k}", x.len());
                assert_eq!(got64.ids, want_ids, "f64, n = {} k = {k}", x.len());
                assert!((logsumexp(x) - lse).abs() <= 1e-13 * lse.abs().max(1.0), "{} vs {lse}", logsumexp(x));
                for (i, (&id, &lp)) in got.ids.iter().zip(&got.base_logprobs).enumerate() {
                    let want = x[id as usize] as f64 - lse;
                    assert!(lp == want as f32 || (lp as f64 - want).abs() <= 1e-6 * want.abs(), "{lp} vs {want}");
                    let lp64 = got64.base_logprobs[i];
                    assert!(lp64 == want || (lp64 - want).abs() <= 1e-13 * want.abs().max(1.0), "{lp64} vs {want}");
                }
            }
        }
        if k > 0 && k < x.len() {
            // The portable scan (the fallback without AVX2) agrees with the one that ran.
            match (top_k(x, k), top_k_portable(x, k)) {
                (Ok(a), Ok(b)) => assert_eq!(a, b),
                (a, b) => assert_eq!(a.is_err(), b.is_err()),
            }
        }
    }

    #[test]
    fn top_k_and_log_normaliser_match_a_full_sort() {
        let mut r = Lcg(5);
        for &n in &[0usize, 1, 2, 7, 31, 32, 33, 63, 64, 100, 257, 1000, 4099, 49_152] {
            for trial in 0..6 {
                let x = row(&mut r, n, trial % 3 == 2);
                for k in [0, 1, 2, 5, 50, 300, n.saturating_sub(1), n, n + 3] {
                    check(&x, k);
                }
            }
        }
        // Ascending and descending rows (the threshold rises at every entry, or never), and all ties.
        let up: Vec<f32> = (0..5000).map(|i| i as f32 * 0.01).collect();
        let down: Vec<f32> = up.iter().rev().copied().collect();
        for x in [up, down, vec![1.5; 3000], vec![f32::NEG_INFINITY; 40]] {
            for k in [1, 50, 1000] {
                check(&x, k);
            }
        }
        // Fewer finite logits than k: the -inf ones follow in id order.
        let mut x = vec![f32::NEG_INFINITY; 500];
        x[400] = 1.0;
        x[7] = 2.0;
        assert_eq!(select(&x, Selection::TopK(4)).unwrap().ids, vec![7, 400, 0, 1]);
        check(&x, 50);
        assert!(select(&x, Selection::TopK(0)).is_err());
    }

    #[test]
    fn logsumexp_edge_cases() {
        assert_eq!(logsumexp::<f32>(&[]), f64::NEG_INFINITY);
        assert_eq!(logsumexp(&[f32::NEG_INFINITY; 40]), f64::NEG_INFINITY);
        assert!(logsumexp(&[0.0f32, f32::INFINITY]).is_nan());
        let mut x = vec![0.5f32; 100];
        x[77] = f32::NAN;
        assert!(logsumexp(&x).is_nan());
        assert!(logsumexp(&x.iter().map(|&v| v as f64).collect::<Vec<_>>()).is_nan());
        // Entries more than 708 below the maximum underflow to exactly 0.
        let x = [0.0f32, -800.0, -1e30, 1e-3];
        let want = ((0.0f64).exp() + (1e-3f32 as f64).exp()).ln();
        assert!((logsumexp(&x) - want).abs() < 1e-15);
    }
}
