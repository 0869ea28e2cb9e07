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
}
