//! Host side of kernels/choose.cu: one token per row of the final policy, greedy or sampled with the Philox
//! draws of `crate::sampling` (its CPU reference), keyed by (seed, row, step). [`Gpu::choose`].

use super::device::{DevBuf, DevPtr};
use super::{Gpu, Launch, check_i32};
use crate::error::{CageError, Result};
use crate::sampling::Choice;

/// The buffers of [`Gpu::choose`].
#[derive(Default)]
pub(super) struct ChooseBuffers {
    pi: DevBuf,
    ids: DevBuf,
    tokens: DevBuf,
}

/// What `cage_choose` reads and writes: device buffers, the extents and the draw's key.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct ChooseArgs {
    /// B x n policy.
    pub(super) pi: DevPtr,
    pub(super) rows: usize,
    pub(super) n: usize,
    /// B x n candidate ids, or 0: the token is the candidate index.
    pub(super) ids: DevPtr,
    pub(super) choice: Choice,
    pub(super) seed: u64,
    pub(super) step: u32,
    /// Device address of the step (read when the kernel runs, so that a replayed graph sees each step's), or 0:
    /// `step`.
    pub(super) step_at: DevPtr,
    /// B row numbers keying the draws, or 0: the row's index in the batch.
    pub(super) keys: DevPtr,
    /// B tokens out.
    pub(super) tokens: DevPtr,
}

/// The mode code of kernels/choose.cu (CHOOSE_GREEDY, CHOOSE_GUMBEL, CHOOSE_RACE).
fn choice_code(c: Choice) -> i32 {
    match c {
        Choice::Greedy => 0,
        Choice::Gumbel => 1,
        Choice::Race => 2,
    }
}

impl Gpu {
    /// Picks one token per row from the policy `pi` (B x n). `ids` (B x n) maps candidates to token ids; without
    /// it the token is the candidate index. Sampling draws depend only on (seed, row, step, candidate).
    #[allow(clippy::too_many_arguments)]
    pub fn choose(
        &mut self,
        pi: &[f32],
        rows: usize,
        n: usize,
        ids: Option<&[u32]>,
        choice: Choice,
        seed: u64,
        step: u32,
    ) -> Result<Vec<u32>> {
        if rows == 0 || n == 0 || pi.len() != rows * n {
            return Err(CageError::Shape { what: "policy".into(), expected: rows * n, got: pi.len() });
        }
        check_i32("candidates", n)?;
        if let Some((i, x)) = pi.iter().enumerate().find(|(_, x)| !(x.is_finite() && **x >= 0.0)) {
            return Err(CageError::NonFinite {
                what: "policy (must be finite and >= 0)".into(),
                index: i,
                value: format!("{x}"),
            });
        }
        for r in 0..rows {
            if pi[r * n..(r + 1) * n].iter().all(|&x| x == 0.0) {
                return Err(CageError::EmptyCandidates { row: r });
            }
        }
        if let Some(ids) = ids
            && ids.len() != rows * n
        {
            return Err(CageError::Shape { what: "candidate ids".into(), expected: rows * n, got: ids.len() });
        }
        let (dev, b) = (self.dev.as_mut(), &mut self.choose);
        let args = ChooseArgs {
            pi: b.pi.upload(dev, pi)?,
            rows,
            n,
            ids: match ids {
                Some(ids) => b.ids.upload(dev, ids)?,
                None => 0,
            },
            choice,
            seed,
            step,
            step_at: 0,
            keys: 0,
            tokens: b.tokens.reserve(dev, rows * 4)?,
        };
        // SAFETY: the buffers were sized above on this device.
        unsafe { self.launch_choose(&args)? };
        self.download(args.tokens, rows)
    }

    /// Launches `cage_choose` (kernels/choose.cu): one block per row.
    ///
    /// # Safety
    /// Every non-zero pointer of `a` must be device memory of this `Gpu` holding the stated number of elements.
    pub(super) unsafe fn launch_choose(&mut self, a: &ChooseArgs) -> Result<()> {
        let launch = Launch::new("cage_choose")
            .grid(a.rows as u32)
            .block(a.n.div_ceil(4).next_multiple_of(32).clamp(32, 1024) as u32)
            .ptr(a.pi)
            .i32(a.n as i32)
            .ptr(a.ids)
            .i32(choice_code(a.choice))
            .u64(a.seed)
            .u32(a.step)
            .ptr(a.step_at)
            .ptr(a.keys)
            .ptr(a.tokens);
        // SAFETY: the arguments follow cage_choose in kernels/choose.cu; the caller vouches for the buffers.
        unsafe { launch.run(self.dev.as_mut()) }
    }
}
