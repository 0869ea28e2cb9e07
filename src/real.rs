//! The floating-point types the solvers run in (`f32`, `f64`). Reductions always accumulate in `f64`, so an
//! `f32` solve loses precision only in the element-wise work, not in sums over 100k-token vocabularies.

use num_traits::Float;
use std::fmt::{Debug, Display};

/// A working precision of the solvers.
pub trait Real: Float + Default + Debug + Display + Send + Sync + Copy + 'static {
    /// `"f32"` or `"f64"`.
    const NAME: &'static str;
    /// Default absolute convergence tolerance on the payoffs, relative to the row's value scale.
    const DEFAULT_TOL: f64;
    /// Lossless (`f64`) or rounding (`f32`) conversion from `f64`.
    fn of(x: f64) -> Self;
    /// Conversion to `f64`.
    fn f64(self) -> f64;
    /// `exp(x)` for the softmax's arguments `x <= 0`, written without branches or calls so that loops over it
    /// vectorise: Cody-Waite reduction, a polynomial, and 2^n built in the exponent bits. Relative error
    /// below 2e-7 (`f32`) / 1e-15 (`f64`); exactly 0 below the underflow threshold and for `-inf`.
    fn exp_nonpos(self) -> Self;
}

impl Real for f32 {
    const NAME: &'static str = "f32";
    const DEFAULT_TOL: f64 = 1e-5;
    #[inline(always)]
    fn of(x: f64) -> Self {
        x as f32
    }
    #[inline(always)]
    fn f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn exp_nonpos(self) -> Self {
        const LO: f32 = -87.33;
        // 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits.
        const ROUND: f32 = 12_582_912.0;
        let x = if self > LO { self } else { LO };
        let x = if x < 0.0 { x } else { 0.0 };
        let k = x * std::f32::consts::LOG2_E + ROUND;
        let n = k - ROUND;
        let r = (x - n * 0.693_359_4) - n * -2.121_944_4e-4;
        // Cephes expf polynomial on [-ln2/2, ln2/2].
        let mut p = 1.987_569_1e-4f32;
        p = p * r + 1.398_199_9e-3;
        p = p * r + 8.333_452e-3;
        p = p * r + 4.166_579_6e-2;
        p = p * r + 1.666_666_5e-1;
        p = p * r + 0.5;
        let y = p * r * r + r + 1.0;
        let scale = f32::from_bits(k.to_bits().wrapping_add(127) << 23);
        if self > LO { y * scale } else { 0.0 }
    }
}

impl Real for f64 {
    const NAME: &'static str = "f64";
    const DEFAULT_TOL: f64 = 1e-11;
    #[inline(always)]
    fn of(x: f64) -> Self {
        x
    }
    #[inline(always)]
    fn f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn exp_nonpos(self) -> Self {
        use exp64::*;
        let x = if self > LO { self } else { LO };
        let x = if x < 0.0 { x } else { 0.0 };
        let k = x * std::f64::consts::LOG2_E + ROUND;
        let n = k - ROUND;
        let r = (x - n * LN2_HI) - n * LN2_LO;
        let mut p = TAYLOR[0];
        for c in &TAYLOR[1..] {
            p = p * r + c;
        }
        let scale = f64::from_bits(k.to_bits().wrapping_add(1023) << 52);
        if self > LO { p * scale } else { 0.0 }
    }
}

/// The constants of the f64 [`Real::exp_nonpos`], shared with the vectorised row sums of `softmax.rs`, which
/// compute the same function lane by lane.
pub(crate) mod exp64 {
    /// Below this, `exp` is 0 (just above the f64 underflow threshold).
    pub const LO: f64 = -708.0;
    /// 1.5 * 2^52: adding it rounds to an integer held in the low mantissa bits.
    pub const ROUND: f64 = 6_755_399_441_055_744.0;
    /// ln 2 split in two (Cody-Waite): `LN2_HI` has trailing zero bits, so `n * LN2_HI` is exact.
    pub const LN2_HI: f64 = 6.931_471_803_691_238e-1;
    /// The rest of ln 2.
    pub const LN2_LO: f64 = 1.908_214_929_270_587_7e-10;
    /// Taylor series of exp to degree 12 on [-ln2/2, ln2/2], highest degree first (Horner): truncation error
    /// < 2e-16 relative.
    pub const TAYLOR: [f64; 13] = [
        1.0 / 479_001_600.0,
        1.0 / 39_916_800.0,
        1.0 / 3_628_800.0,
        1.0 / 362_880.0,
        1.0 / 40_320.0,
        1.0 / 5_040.0,
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ];
}
