//! Host side of kernels/policy.cu: the policies of `base`, `linear`, `genarm` and `mod` over the candidates
//! ([`Gpu::policy`]), whose CPU reference is the host policy stage (`crate::baselines`), and the report of a
//! resident decoding step (the token and the principals' values there, the only numbers that cross to the host).

use super::device::{DevBuf, DevPtr};
use super::{Gpu, Launch, bad, check_i32};
use crate::error::{CageError, Result};

/// A policy without an equilibrium, as kernels/policy.cu computes it (POLICY_BASE ... POLICY_MOD).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DevicePolicy {
    /// softmax(log pi0).
    Base,
    /// softmax(log pi0 + sum_j v_j / tau), v the preprocessed, weighted values.
    Linear,
    /// softmax(log pi0 + sum_j w_j log pi_j), the principals' own policies renormalised over the candidates.
    Genarm,
    /// softmax(sum_j w_j log pi_j) (reverse-KL MOD; log pi0 is not read).
    Mod,
}

impl DevicePolicy {
    fn code(self) -> i32 {
        match self {
            DevicePolicy::Base => 0,
            DevicePolicy::Linear => 1,
            DevicePolicy::Genarm => 2,
            DevicePolicy::Mod => 3,
        }
    }
}

/// What `cage_policy` reads and writes, all on the device.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct PolicyArgs {
    pub(super) policy: DevicePolicy,
    pub(super) rows: usize,
    pub(super) j: usize,
    pub(super) k: usize,
    /// B x k log pi0.
    pub(super) logp: DevPtr,
    /// B x J x k preprocessed values (read by `linear`).
    pub(super) values: DevPtr,
    /// B x J x k own log-probabilities (read by `genarm` and `mod`).
    pub(super) own: DevPtr,
    /// B x J weights.
    pub(super) weights: DevPtr,
    pub(super) tau: f32,
    /// B x k policy out.
    pub(super) pi: DevPtr,
}

/// What `cage_step_report` reads and writes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct ReportArgs {
    /// B chosen tokens and B x k candidate ids.
    pub(super) tokens: DevPtr,
    pub(super) ids: DevPtr,
    pub(super) rows: usize,
    pub(super) k: usize,
    /// B x J x k raw values.
    pub(super) raw: DevPtr,
    pub(super) j: usize,
    /// B x 3 equilibrium statistics, or 0.
    pub(super) stats: DevPtr,
    /// B x (1 + J) words out.
    pub(super) out: DevPtr,
}

/// A report word above every vocabulary: the row has no candidate of positive probability.
pub(super) const REPORT_NO_CANDIDATE: u32 = 0xffff_ffff;
/// A report word: a value or the equilibrium's residual is not finite.
pub(super) const REPORT_NOT_FINITE: u32 = 0xffff_fffe;

/// The buffers of [`Gpu::policy`].
#[derive(Default)]
pub(super) struct PolicyBuffers {
    logp: DevBuf,
    values: DevBuf,
    own: DevBuf,
    weights: DevBuf,
    pi: DevBuf,
}

impl Gpu {
    /// The policy of `policy` for B rows of k candidates from host inputs: `logp` B x k, `values` (the
    /// preprocessed, weighted values, read by `linear`) and `own` (the principals' own log-probabilities, read
    /// by `genarm` and `mod`) B x J x k, `weights` B x J. Returns B x k probabilities. The entry point of the
    /// kernel's test against the host policy stage; the decoding loop runs the kernel on device buffers.
    #[allow(clippy::too_many_arguments)]
    pub fn policy(
        &mut self,
        policy: DevicePolicy,
        rows: usize,
        principals: usize,
        k: usize,
        logp: &[f32],
        values: &[f32],
        own: &[f32],
        weights: &[f32],
        tau: f32,
    ) -> Result<Vec<f32>> {
        let (b, j) = (rows, principals);
        if b == 0 || k == 0 {
            return Err(bad(format!("a policy of {b} rows x {k} candidates: both must be >= 1")));
        }
        check_i32("rows x principals x candidates", b * j.max(1) * k)?;
        for (what, x, n) in [("log pi0", logp, b * k), ("values", values, b * j * k), ("own", own, b * j * k)] {
            if x.len() != n {
                return Err(CageError::Shape { what: what.into(), expected: n, got: x.len() });
            }
        }
        if weights.len() != b * j {
            return Err(CageError::Shape { what: "weights".into(), expected: b * j, got: weights.len() });
        }
        if let Some((i, w)) = weights.iter().enumerate().find(|(_, w)| !(w.is_finite() && **w >= 0.0)) {
            return Err(CageError::BadWeight { principal: format!("{}", i % j.max(1)), value: *w as f64 });
        }
        if !crate::problem::valid_tau(tau) {
            return Err(CageError::BadTau(tau as f64));
        }
        if policy == DevicePolicy::Mod && j == 0 {
            return Err(bad("MOD needs at least one policy".into()));
        }
        let (dev, bufs) = (self.dev.as_mut(), &mut self.policy);
        let args = PolicyArgs {
            policy,
            rows: b,
            j,
            k,
            logp: bufs.logp.upload(dev, logp)?,
            values: bufs.values.upload(dev, values)?,
            own: bufs.own.upload(dev, own)?,
            weights: bufs.weights.upload(dev, weights)?,
            tau,
            pi: bufs.pi.reserve(dev, b * k * 4)?,
        };
        // SAFETY: the buffers were sized above on this device.
        unsafe { self.launch_policy(&args)? };
        self.download(args.pi, b * k)
    }

    /// Launches `cage_policy` (kernels/policy.cu): one block per row.
    ///
    /// # Safety
    /// Every pointer the policy reads must be device memory of this `Gpu` holding the stated number of elements.
    pub(super) unsafe fn launch_policy(&mut self, a: &PolicyArgs) -> Result<()> {
        let launch = Launch::new("cage_policy")
            .grid(a.rows as u32)
            .block(a.k.div_ceil(4).next_multiple_of(32).clamp(32, 1024) as u32)
            .i32(a.policy.code())
            .ptr(a.logp)
            .ptr(a.values)
            .ptr(a.own)
            .ptr(a.weights)
            .f32(a.tau)
            .i32(a.j as i32)
            .i32(a.k as i32)
            .ptr(a.pi);
        // SAFETY: the arguments follow cage_policy in kernels/policy.cu; the caller vouches for the buffers.
        unsafe { launch.run(self.dev.as_mut()) }
    }

    /// Launches `cage_step_report` (kernels/policy.cu): one thread per row.
    ///
    /// # Safety
    /// Every non-zero pointer of `a` must be device memory of this `Gpu` holding the stated number of elements.
    pub(super) unsafe fn launch_report(&mut self, a: &ReportArgs) -> Result<()> {
        let launch = Launch::new("cage_step_report")
            .grid(a.rows.div_ceil(32) as u32)
            .block(32)
            .ptr(a.tokens)
            .ptr(a.ids)
            .i32(a.k as i32)
            .ptr(a.raw)
            .i32(a.j as i32)
            .ptr(a.stats)
            .i32(a.rows as i32)
            .ptr(a.out);
        // SAFETY: the arguments follow cage_step_report in kernels/policy.cu; the caller vouches for the buffers.
        unsafe { launch.run(self.dev.as_mut()) }
    }
}
