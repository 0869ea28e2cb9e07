//! Host side of kernels/jacobi.cu: the paper's Algorithm 1 (nonlinear Jacobi), one block per row, with the
//! options, inner optimisers and stopping rules of `solver::jacobi` (its CPU reference). [`Gpu::jacobi`].

use super::device::DevBuf;
use super::equilibrium::SolutionAt;
use super::{Gpu, Launch, bad, check_i32};
use crate::error::Result;
use crate::problem::Batch;
use crate::solution::Solution;
use crate::solver::jacobi::{Inner, JacobiOptions};

/// The buffers of [`Gpu::jacobi`]: inputs, the iterates' scratch (B x (2J + 6) x N) and the solution.
#[derive(Default)]
pub(super) struct JacobiBuffers {
    base: DevBuf,
    values: DevBuf,
    tau: DevBuf,
    scratch: DevBuf,
    pi: DevBuf,
    agg: DevBuf,
    y: DevBuf,
    payoff: DevBuf,
    stats: DevBuf,
}

impl Gpu {
    /// The paper's Algorithm 1 (nonlinear Jacobi) on every row with options `o` (see
    /// [`crate::solver::jacobi`]): `JacobiOptions::converged` for the `jacobi` method, `JacobiOptions::truncated`
    /// for the truncated `paper` mode. f32 on the device, where the CPU version runs in f64.
    pub fn jacobi(&mut self, batch: &Batch<f32>, o: &JacobiOptions) -> Result<Solution<f32>> {
        let (rows, n, j) = (batch.rows(), batch.candidates(), batch.principals());
        check_i32("candidates", n)?;
        check_i32("principals", j)?;
        if o.max_rounds == 0 || o.max_rounds > i32::MAX as u32 || o.inner_max_iter > i32::MAX as u32 {
            return Err(bad(format!("Jacobi rounds must be in 1..=2^31-1, got {}", o.max_rounds)));
        }
        for (what, x) in [("tol", o.tol), ("inner_tol", o.inner_tol), ("inner_ftol", o.inner_ftol)] {
            if !(x.is_finite() && x >= 0.0) {
                return Err(bad(format!("Jacobi {what} must be a finite number >= 0, got {x}")));
            }
        }
        if !(o.damping > 0.0 && o.damping <= 1.0) {
            return Err(bad(format!("Jacobi damping must be in (0, 1], got {}", o.damping)));
        }
        let (dev, b) = (self.dev.as_mut(), &mut self.jacobi);
        let base = b.base.upload(dev, batch.base())?;
        let values = b.values.upload(dev, batch.values())?;
        let tau = b.tau.upload(dev, batch.tau())?;
        let scratch = b.scratch.reserve(dev, rows * (2 * j + 6) * n * 4)?;
        let out = SolutionAt {
            pi: b.pi.reserve(dev, rows * n * 4)?,
            agg: b.agg.reserve(dev, rows * n * 4)?,
            y: b.y.reserve(dev, rows * j * n * 4)?,
            payoff: b.payoff.reserve(dev, rows * j * 4)?,
            stats: b.stats.reserve(dev, rows * 3 * 4)?,
        };
        let launch = Launch::new("cage_jacobi_f32")
            .grid(rows as u32)
            .block(n.div_ceil(2).next_multiple_of(32).clamp(32, 256) as u32)
            .ptr(base)
            .ptr(values)
            .ptr(tau)
            .i32(n as i32)
            .i32(j as i32)
            .i32(o.max_rounds as i32)
            .i32(o.inner_max_iter as i32)
            .f32(o.tol as f32)
            .f32(o.inner_tol as f32)
            .f32(o.inner_ftol as f32)
            .f32(o.damping as f32)
            .i32(i32::from(o.inner == Inner::ScaledProjectedGradient))
            .ptr(scratch)
            .ptr(out.pi)
            .ptr(out.agg)
            .ptr(out.y)
            .ptr(out.payoff)
            .ptr(out.stats);
        // SAFETY: the arguments follow cage_jacobi_f32 in kernels/jacobi.cu; the buffers were sized above for
        // this shape.
        unsafe { launch.run(dev)? };
        self.download_solution(rows, n, j, &out)
    }
}
