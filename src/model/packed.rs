//! Lossless packing of weight matrices that came from llama.cpp's Q4_1 / Q8_0 blocks.
//!
//! Decoding is bound by reading the weights once per step. A model imported from a quantized GGUF holds f32
//! values that are exactly `q * d + m` (Q4_1) or `q * d` (Q8_0) per block of 32, so they can be stored again in
//! 24 or 36 bytes per block instead of 128 and expanded in registers with the same f32 arithmetic the importer
//! used: the expanded values are bit-identical to the f32 weights. Packing is verified block by block; a
//! matrix with any block that does not round-trip exactly stays f32 only.

use super::linalg::SendPtr;
use rayon::prelude::*;

const QK: usize = 32;

/// A packed copy of a `[rows, cols]` matrix (`cols` a multiple of 32).
#[derive(Debug, Clone)]
pub enum Packed {
    /// Per block: scale, minimum, 16 bytes of nibbles (low nibble = element j, high = element j + 16).
    Q4_1 {
        /// (d, m) per block.
        dm: Vec<[f32; 2]>,
        /// 16 bytes per block.
        qs: Vec<u8>,
    },
    /// Per block: scale and 32 signed bytes.
    Q8_0 {
        /// d per block.
        d: Vec<f32>,
        /// 32 bytes per block.
        qs: Vec<i8>,
    },
}

fn f16_round(x: f32) -> f32 {
    half::f16::from_f32(x).to_f32()
}

fn try_q4_1(w: &[f32]) -> Option<Packed> {
    let nb = w.len() / QK;
    let mut dm = Vec::with_capacity(nb);
    let mut qs = Vec::with_capacity(nb * 16);
    for blk in w.chunks_exact(QK) {
        let m = blk.iter().copied().fold(f32::INFINITY, f32::min);
        let mx = blk.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        // llama.cpp stores d and m as f16; the block maximum is q = 15 unless rounding pushed it down.
        let d = f16_round((mx - m) / 15.0);
        if f16_round(m) != m {
            return None;
        }
        let mut q = [0u8; QK];
        for (qi, &x) in q.iter_mut().zip(blk) {
            let v = if d > 0.0 { ((x - m) / d).round() } else { 0.0 };
            if !(0.0..=15.0).contains(&v) || v * d + m != x {
                return None;
            }
            *qi = v as u8;
        }
        dm.push([d, m]);
        for j in 0..16 {
            qs.push(q[j] | (q[j + 16] << 4));
        }
    }
    Some(Packed::Q4_1 { dm, qs })
}

fn try_q8_0(w: &[f32]) -> Option<Packed> {
    let nb = w.len() / QK;
    let mut ds = Vec::with_capacity(nb);
    let mut qs = Vec::with_capacity(nb * QK);
    for blk in w.chunks_exact(QK) {
        let amax = blk.iter().fold(0f32, |a, x| a.max(x.abs()));
        let d = f16_round(amax / 127.0);
        for &x in blk {
            let v = if d > 0.0 { (x / d).round() } else { 0.0 };
            if !(-128.0..=127.0).contains(&v) || v * d != x {
                return None;
            }
            qs.push(v as i8);
        }
        ds.push(d);
    }
    Some(Packed::Q8_0 { d: ds, qs })
}

impl Packed {
    /// A lossless packed copy of `w` (`cols` per row), if every block round-trips exactly.
    pub fn try_pack(w: &[f32], cols: usize) -> Option<Packed> {
        if cols == 0 || !cols.is_multiple_of(QK) || !w.len().is_multiple_of(cols) || w.is_empty() {
            return None;
        }
        try_q4_1(w).or_else(|| try_q8_0(w))
    }

    /// Number of 32-value blocks.
    fn blocks(&self) -> usize {
        match self {
            Packed::Q4_1 { dm, .. } => dm.len(),
            Packed::Q8_0 { d, .. } => d.len(),
        }
    }

    /// Bytes this copy takes.
    pub fn bytes(&self) -> usize {
        match self {
            Packed::Q4_1 { dm, qs } => dm.len() * 8 + qs.len(),
            Packed::Q8_0 { d, qs } => d.len() * 4 + qs.len(),
        }
    }

    /// Expands block `b` into the 32 f32 values it was packed from.
    #[inline(always)]
    fn block(&self, b: usize, out: &mut [f32; QK]) {
        match self {
            Packed::Q4_1 { dm, qs } => {
                let [d, m] = dm[b];
                let q: &[u8; 16] = qs[b * 16..b * 16 + 16].try_into().expect("16 bytes per block");
                for j in 0..16 {
                    out[j] = (q[j] & 0x0f) as f32 * d + m;
                    out[j + 16] = (q[j] >> 4) as f32 * d + m;
                }
            }
            Packed::Q8_0 { d, qs } => {
                let d = d[b];
                let q: &[i8; QK] = qs[b * QK..(b + 1) * QK].try_into().expect("32 bytes per block");
                for (o, &q) in out.iter_mut().zip(q) {
                    *o = q as f32 * d;
                }
            }
        }
    }

    /// `out[m x n] (+)= alpha * x[m x k] * W^T` for a small `m`, reading the packed weights once.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_t(&self, x: &[f32], m: usize, k: usize, n: usize, out: &mut [f32], accumulate: bool, alpha: f32) {
        assert!(out.len() >= m * n, "packed matmul: buffers smaller than the shapes");
        let out = SendPtr(out.as_mut_ptr());
        run_jobs(x, m, k, [Job { p: self, n, out: &out, accumulate, alpha }]);
    }
}

/// `out_i[m x n_i] = x[m x k] * W_i^T` for several packed matrices with the same input (q, k and v; gate and
/// up) in one parallel loop: a decode step at batch 1 is a few hundred small products, and each parallel loop
/// costs a fork and a join on every core.
pub fn matmul_t_many<const N: usize>(x: &[f32], m: usize, k: usize, products: [(&Packed, usize, &mut [f32]); N]) {
    let ptrs = products.each_ref().map(|(_, n, out)| {
        assert!(out.len() >= m * n, "packed matmul: buffers smaller than the shapes");
        SendPtr(out.as_ptr().cast_mut())
    });
    let mut i = 0;
    let jobs = products.map(|(p, n, _)| {
        i += 1;
        Job { p, n, out: &ptrs[i - 1], accumulate: false, alpha: 1.0 }
    });
    run_jobs(x, m, k, jobs);
}

/// Which explicit kernel the CPU runs (the standard library caches the detection).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Isa {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Portable,
}

fn isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("fma") {
            return Isa::Avx512;
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            return Isa::Avx2;
        }
    }
    Isa::Portable
}

/// The products of `jobs` (same `x`) as one parallel loop over chunks of `ROWS` output rows.
fn run_jobs<const N: usize>(x: &[f32], m: usize, k: usize, jobs: [Job; N]) {
    run_jobs_on(isa(), x, m, k, jobs)
}

fn run_jobs_on<const N: usize>(isa: Isa, x: &[f32], m: usize, k: usize, jobs: [Job; N]) {
    assert!(x.len() >= m * k && k.is_multiple_of(QK), "packed matmul: buffers smaller than the shapes");
    for j in &jobs {
        assert_eq!(j.p.blocks(), j.n * k / QK, "packed matmul: the matrix is not [n x k]");
    }
    let chunks = jobs.each_ref().map(|j| j.n.div_ceil(ROWS));
    let total: usize = chunks.iter().sum();
    (0..total).into_par_iter().for_each(|mut c| {
        let mut j = 0;
        while c >= chunks[j] {
            c -= chunks[j];
            j += 1;
        }
        let t = Tile { job: &jobs[j], x, m, k };
        match isa {
            // SAFETY: the CPU supports AVX-512F and FMA (detected above).
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { t.run_avx512(c) },
            // SAFETY: the CPU supports AVX2 and FMA (detected above).
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { t.run_avx2(c) },
            Isa::Portable => t.run(c),
        }
    });
}

/// Output rows per parallel task.
const ROWS: usize = 16;

/// How far ahead of the block being expanded the kernels prefetch the quantized bytes (Q4_1; twice as far for
/// Q8_0's 32-byte blocks, and proportionally for the scales). A batch-1 step streams ~100 MB of weights, and
/// left to the hardware prefetcher the loads of each block waited on memory for most of the step: the
/// out-of-order window holds only a few dozen blocks of expansion work, too few loads in flight to cover the
/// latency. 64 blocks ahead is a few hundred nanoseconds of work.
const PREFETCH: usize = 1024;

/// Prefetches the cache line at `p` into all cache levels (`p` need not be in bounds: a prefetch never faults).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch(p: *const u8) {
    // SAFETY: prefetching is a hint without architectural effect, valid for any address.
    unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast()) }
}

/// One product: the matrix, its output rows and where they go.
struct Job<'a> {
    p: &'a Packed,
    n: usize,
    out: &'a SendPtr,
    accumulate: bool,
    alpha: f32,
}

/// A job with its input, as one parallel task sees it.
struct Tile<'a> {
    job: &'a Job<'a>,
    x: &'a [f32],
    m: usize,
    k: usize,
}

impl Tile<'_> {
    /// Writes `alpha * v` to (or adds it to) `out[r * n + o]`.
    #[inline(always)]
    fn store(&self, r: usize, o: usize, v: f32) {
        let j = self.job;
        // SAFETY: each (row, o) is written by exactly one chunk; out holds m*n floats (asserted).
        unsafe {
            let p = j.out.0.add(r * j.n + o);
            *p = if j.accumulate { *p + j.alpha * v } else { j.alpha * v };
        }
    }

    /// Output rows `chunk * ROWS ..` with AVX-512: a block expands into two registers of sixteen weights,
    /// shared by up to eight rows of x.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn run_avx512(&self, chunk: usize) {
        let m = self.m;
        let mut r0 = 0;
        while r0 < m {
            // SAFETY (all arms): AVX-512F and FMA are enabled on this function; rows r0..r0 + R exist.
            unsafe {
                match m - r0 {
                    1 => self.tile_avx512::<1>(chunk, r0),
                    2 => self.tile_avx512::<2>(chunk, r0),
                    3 => self.tile_avx512::<3>(chunk, r0),
                    4 => self.tile_avx512::<4>(chunk, r0),
                    5 => self.tile_avx512::<5>(chunk, r0),
                    6 => self.tile_avx512::<6>(chunk, r0),
                    7 => self.tile_avx512::<7>(chunk, r0),
                    _ => self.tile_avx512::<8>(chunk, r0),
                }
            }
            r0 += 8;
        }
    }

    /// Rows `r0 .. r0 + R` of x against the chunk's output rows, sixteen lanes.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn tile_avx512<const R: usize>(&self, chunk: usize, r0: usize) {
        use std::arch::x86_64::*;
        let (k, n) = (self.k, self.job.n);
        let nbk = k / QK;
        let xp = self.x.as_ptr();
        // Exact expansion: Q4_1's q * d needs at most 15 significant bits (4-bit q, f16 d) and Q8_0's 19, so
        // the products are exact in f32 and one fused q * d + m rounds like the importer's multiply-then-add.
        // SAFETY: block indices stay below n * k / 32 (asserted in run_jobs) and x reads below m * k.
        unsafe {
            for o in chunk * ROWS..((chunk + 1) * ROWS).min(n) {
                let mut acc = [[_mm512_setzero_ps(); 2]; R];
                match self.job.p {
                    Packed::Q4_1 { dm, qs } => {
                        let iota = _mm512_setr_ps(
                            0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0,
                        );
                        for b in 0..nbk {
                            let blk = o * nbk + b;
                            if blk.is_multiple_of(4) {
                                prefetch(qs.as_ptr().wrapping_add(blk * 16 + PREFETCH));
                                if blk.is_multiple_of(8) {
                                    prefetch(dm.as_ptr().wrapping_add(blk + PREFETCH / 16).cast());
                                }
                            }
                            let [d, mn] = *dm.get_unchecked(blk);
                            // The block's sixteen possible weights q * d + m in one register, then each nibble
                            // picks its weight (vpermps reads the low four bits of each index): five vector
                            // instructions per block instead of seven for mask, two conversions and two
                            // multiply-adds, which is what bounds a batch-1 step.
                            let table = _mm512_fmadd_ps(iota, _mm512_set1_ps(d), _mm512_set1_ps(mn));
                            let v = _mm512_cvtepu8_epi32(_mm_loadu_si128(qs.as_ptr().add(blk * 16).cast()));
                            let w = [
                                _mm512_permutexvar_ps(v, table),
                                _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(v), table),
                            ];
                            for (r, a) in acc.iter_mut().enumerate() {
                                let xr = xp.add((r0 + r) * k + b * QK);
                                a[0] = _mm512_fmadd_ps(w[0], _mm512_loadu_ps(xr), a[0]);
                                a[1] = _mm512_fmadd_ps(w[1], _mm512_loadu_ps(xr.add(16)), a[1]);
                            }
                        }
                    }
                    Packed::Q8_0 { d, qs } => {
                        for b in 0..nbk {
                            let blk = o * nbk + b;
                            if blk.is_multiple_of(2) {
                                prefetch(qs.as_ptr().wrapping_add(blk * QK + 2 * PREFETCH).cast());
                                if blk.is_multiple_of(16) {
                                    prefetch(d.as_ptr().wrapping_add(blk + PREFETCH / 8).cast());
                                }
                            }
                            let d = _mm512_set1_ps(*d.get_unchecked(blk));
                            let q = qs.as_ptr().add(blk * QK);
                            let f = |i: usize| {
                                let v = _mm512_cvtepi8_epi32(_mm_loadu_si128(q.add(i * 16).cast()));
                                _mm512_mul_ps(_mm512_cvtepi32_ps(v), d)
                            };
                            let w = [f(0), f(1)];
                            for (r, a) in acc.iter_mut().enumerate() {
                                let xr = xp.add((r0 + r) * k + b * QK);
                                a[0] = _mm512_fmadd_ps(w[0], _mm512_loadu_ps(xr), a[0]);
                                a[1] = _mm512_fmadd_ps(w[1], _mm512_loadu_ps(xr.add(16)), a[1]);
                            }
                        }
                    }
                }
                for (r, a) in acc.iter().enumerate() {
                    self.store(r0 + r, o, _mm512_reduce_add_ps(_mm512_add_ps(a[0], a[1])));
                }
            }
        }
    }

    /// Output rows `chunk * ROWS ..` with explicit AVX2: each block is expanded once into four registers and
    /// multiplied into up to eight rows of x held in their own accumulators, so the per-row cost is four fused
    /// multiply-adds per block and the expansion is paid once for all rows.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run_avx2(&self, chunk: usize) {
        let m = self.m;
        let mut r0 = 0;
        while r0 < m {
            // SAFETY (all four arms): AVX2 and FMA are enabled on this function; rows r0..r0 + R exist.
            unsafe {
                match m - r0 {
                    1 => self.tile_avx2::<1>(chunk, r0),
                    2 => self.tile_avx2::<2>(chunk, r0),
                    3 => self.tile_avx2::<3>(chunk, r0),
                    4 => self.tile_avx2::<4>(chunk, r0),
                    5 => self.tile_avx2::<5>(chunk, r0),
                    6 => self.tile_avx2::<6>(chunk, r0),
                    7 => self.tile_avx2::<7>(chunk, r0),
                    _ => self.tile_avx2::<8>(chunk, r0),
                }
            }
            r0 += 8;
        }
    }

    /// Rows `r0 .. r0 + R` of x against the chunk's output rows.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile_avx2<const R: usize>(&self, chunk: usize, r0: usize) {
        use std::arch::x86_64::*;
        // Independent accumulation chains per row: four for one or two rows (the FMA latency would otherwise
        // bound a single row), two for three or four rows, one for five to eight (16 vector registers). Up to
        // eight rows share one expansion of each block.
        let nacc = if R <= 2 {
            4
        } else if R <= 4 {
            2
        } else {
            1
        };
        let (k, n) = (self.k, self.job.n);
        let nbk = k / QK;
        let xp = self.x.as_ptr();
        // SAFETY: the block indices stay below rows * k / 32 (asserted shapes) and the x pointers below m * k;
        // unaligned loads only.
        unsafe {
            for o in chunk * ROWS..((chunk + 1) * ROWS).min(n) {
                let mut acc = [[_mm256_setzero_ps(); 4]; R];
                for b in 0..nbk {
                    let blk = o * nbk + b;
                    // Bit-identical weights: q * d is exact in f32 (see `tile_avx512`), so the fused
                    // multiply-add rounds like `block`'s multiply-then-add.
                    let w: [__m256; 4] = match self.job.p {
                        Packed::Q4_1 { dm, qs } => {
                            if blk.is_multiple_of(4) {
                                prefetch(qs.as_ptr().wrapping_add(blk * 16 + PREFETCH));
                                if blk.is_multiple_of(8) {
                                    prefetch(dm.as_ptr().wrapping_add(blk + PREFETCH / 16).cast());
                                }
                            }
                            let [d, mn] = dm[blk];
                            let (d, mn) = (_mm256_set1_ps(d), _mm256_set1_ps(mn));
                            let q = _mm_loadu_si128(qs[blk * 16..blk * 16 + 16].as_ptr().cast());
                            let mask = _mm_set1_epi8(0x0f);
                            let lo = _mm_and_si128(q, mask);
                            let hi = _mm_and_si128(_mm_srli_epi16::<4>(q), mask);
                            let f = |v: __m128i| _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)), d, mn);
                            [f(lo), f(_mm_srli_si128::<8>(lo)), f(hi), f(_mm_srli_si128::<8>(hi))]
                        }
                        Packed::Q8_0 { d, qs } => {
                            if blk.is_multiple_of(2) {
                                prefetch(qs.as_ptr().wrapping_add(blk * QK + 2 * PREFETCH).cast());
                                if blk.is_multiple_of(16) {
                                    prefetch(d.as_ptr().wrapping_add(blk + PREFETCH / 8).cast());
                                }
                            }
                            let d = _mm256_set1_ps(d[blk]);
                            let q = qs[blk * QK..(blk + 1) * QK].as_ptr();
                            let f = |i: usize| {
                                let v = _mm_loadl_epi64(q.add(i * 8).cast());
                                _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)), d)
                            };
                            [f(0), f(1), f(2), f(3)]
                        }
                    };
                    for (r, a) in acc.iter_mut().enumerate() {
                        let xr = xp.add((r0 + r) * k + b * QK);
                        for (c, wc) in w.iter().enumerate() {
                            let i = c % nacc;
                            a[i] = _mm256_fmadd_ps(*wc, _mm256_loadu_ps(xr.add(c * 8)), a[i]);
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

    /// Output rows `chunk * ROWS ..` (portable): each expanded block is used by up to 8 rows of x before the
    /// next.
    #[inline(always)]
    fn run(&self, chunk: usize) {
        let (x, m, k, n) = (self.x, self.m, self.k, self.job.n);
        let nbk = k / QK;
        let mut wb = [0f32; QK];
        let mut acc = [[0f32; 8]; 8];
        for o in chunk * ROWS..((chunk + 1) * ROWS).min(n) {
            for r0 in (0..m).step_by(8) {
                let rm = (m - r0).min(8);
                for a in acc.iter_mut().take(rm) {
                    *a = [0f32; 8];
                }
                for b in 0..nbk {
                    self.job.p.block(o * nbk + b, &mut wb);
                    for (r, a) in acc.iter_mut().enumerate().take(rm) {
                        let at = (r0 + r) * k + b * QK;
                        let xr: &[f32; QK] = x[at..at + QK].try_into().expect("whole block");
                        // Eight lanes, four steps: straight-line code the vectorizer maps onto one register.
                        let mut s = *a;
                        for c in 0..QK / 8 {
                            for i in 0..8 {
                                s[i] += wb[c * 8 + i] * xr[c * 8 + i];
                            }
                        }
                        *a = s;
                    }
                }
                for (r, h) in acc.iter().enumerate().take(rm) {
                    let v = ((h[0] + h[4]) + (h[1] + h[5])) + ((h[2] + h[6]) + (h[3] + h[7]));
                    self.store(r0 + r, o, v);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every row count the kernels split differently (1 to 8 rows per tile, then a second tile), accumulating
    /// with a scale, against the f32 product of the unpacked weights.
    fn check_against_f32(p: &Packed, w: &[f32], rows: usize, cols: usize) {
        for m in 1..=9 {
            let x: Vec<f32> = (0..m * cols).map(|i| (i as f32 * 0.37).sin()).collect();
            let mut got: Vec<f32> = (0..m * rows).map(|i| i as f32 * 0.01).collect();
            let mut want = got.clone();
            p.matmul_t(&x, m, cols, rows, &mut got, true, 0.5);
            crate::model::linalg::matmul_t(&x, m, cols, w, rows, &mut want, true, 0.5);
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() < 1e-4, "m = {m}: {a} vs {b}");
            }
        }
    }

    /// Every kernel this CPU can run expands the packed blocks into exactly the f32 weights: against the
    /// identity (one row of x per input column), each output is one weight times 1 plus zeros.
    fn check_bit_identical(p: &Packed, w: &[f32], rows: usize, cols: usize) {
        let mut isas = vec![Isa::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            let fma = std::is_x86_feature_detected!("fma");
            if std::is_x86_feature_detected!("avx2") && fma {
                isas.push(Isa::Avx2);
            }
            if std::is_x86_feature_detected!("avx512f") && fma {
                isas.push(Isa::Avx512);
            }
        }
        let eye: Vec<f32> = (0..cols * cols).map(|i| if i % (cols + 1) == 0 { 1.0 } else { 0.0 }).collect();
        for isa in isas {
            let mut got = vec![0f32; cols * rows];
            let out = SendPtr(got.as_mut_ptr());
            run_jobs_on(isa, &eye, cols, cols, [Job { p, n: rows, out: &out, accumulate: false, alpha: 1.0 }]);
            for o in 0..rows {
                for i in 0..cols {
                    assert_eq!(got[i * rows + o].to_bits(), w[o * cols + i].to_bits(), "row {o} column {i}");
                }
            }
        }
    }

    #[test]
    fn several_products_in_one_loop_match_one_at_a_time() {
        let (cols, m) = (64, 3);
        let mats: Vec<(Vec<f32>, usize)> = [19usize, 40, 7]
            .iter()
            .map(|&rows| {
                let w = (0..rows * cols)
                    .map(|i| ((i * 7 + rows) % 16) as f32 * f16_round(0.013) + f16_round(-0.1))
                    .collect();
                (w, rows)
            })
            .collect();
        let ps: Vec<Packed> = mats.iter().map(|(w, _)| Packed::try_pack(w, cols).unwrap()).collect();
        let x: Vec<f32> = (0..m * cols).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut outs: Vec<Vec<f32>> = mats.iter().map(|(_, r)| vec![0f32; m * r]).collect();
        let [a, b, c] = &mut outs[..] else { unreachable!() };
        matmul_t_many(&x, m, cols, [(&ps[0], 19, a.as_mut_slice()), (&ps[1], 40, b), (&ps[2], 7, c)]);
        for ((p, (_, rows)), got) in ps.iter().zip(&mats).zip(&outs) {
            let mut want = vec![0f32; m * rows];
            p.matmul_t(&x, m, cols, *rows, &mut want, false, 1.0);
            assert_eq!(got, &want);
        }
    }

    #[test]
    fn q8_0_values_pack_losslessly_and_multiply_like_f32() {
        // Odd row count: the last parallel chunk is partial.
        let (rows, cols) = (19, 96);
        let mut w = Vec::new();
        for b in 0..rows * cols / QK {
            let d = f16_round(0.0021 * (b % 7 + 1) as f32);
            // q = 127 somewhere in each block: the block's scale is then exactly d (as llama.cpp derives it).
            for j in 0..QK {
                let q = if j == b % QK { 127 } else { ((j * 37 + b * 11) % 255) as i32 - 127 };
                w.push(q as f32 * d);
            }
        }
        let p = Packed::try_pack(&w, cols).expect("packable");
        assert!(matches!(p, Packed::Q8_0 { .. }));
        check_against_f32(&p, &w, rows, cols);
        check_bit_identical(&p, &w, rows, cols);
    }

    #[test]
    fn q4_1_values_pack_losslessly_and_multiply_like_f32() {
        let (rows, cols) = (21, 64);
        let mut w = Vec::new();
        for b in 0..rows * cols / QK {
            let d = f16_round(0.013 * (b + 1) as f32);
            let m = f16_round(-0.1 * b as f32);
            for j in 0..QK {
                w.push(((j * 7 + b) % 16) as f32 * d + m);
            }
        }
        let p = Packed::try_pack(&w, cols).expect("packable");
        assert!(matches!(p, Packed::Q4_1 { .. }));
        check_against_f32(&p, &w, rows, cols);
        check_bit_identical(&p, &w, rows, cols);
        // Arbitrary floats do not pack.
        let r: Vec<f32> = (0..cols).map(|i| (i as f32 * 0.731).sin()).collect();
        assert!(Packed::try_pack(&r, cols).is_none());
    }
}
