//! One decoding step with every intermediate on the device: the base model's logits, the principals' ARM
//! logits and the reference's logits go in as device buffers (where a GPU forward pass left them), and only
//! the chosen tokens and a few per-row numbers come back. The chain is the one of the host entry points,
//! launched back to back on the device's stream: top-k candidates and log pi0 ([`Gpu::candidates`]), the
//! principals' values at them with `shift_min` and the weights ([`Gpu::principal_values`]), the exact
//! equilibrium ([`Gpu::equilibrium`]) and the token choice ([`Gpu::choose`]).

use super::choose::ChooseArgs;
use super::device::{DevBuf, DevPtr};
use super::equilibrium::{EqJob, EqOptions, MAX_PRINCIPALS, SolutionAt, ValueType};
use super::values::ValuesArgs;
use super::{Gpu, bad, check_i32};
use crate::error::{CageError, Result};
use crate::sampling::Choice;

/// Inputs of [`Gpu::decode_step_device`]: device buffers of f32 logits and the small per-row parameters.
#[derive(Clone, Copy, Debug)]
pub struct DeviceStep<'a> {
    /// B rows (sequences).
    pub rows: usize,
    /// V, the vocabulary shared by the base model and the principals.
    pub vocab: usize,
    /// J principals (0 to [`MAX_PRINCIPALS`]).
    pub principals: usize,
    /// Candidates per row (1 to [`MAX_TOP_K`](super::MAX_TOP_K) and at most V).
    pub k: usize,
    /// B x V base-model logits (f32, device).
    pub logits: DevPtr,
    /// B x J x V ARM logits of the principals (f32, device; unused when J = 0).
    pub arm: DevPtr,
    /// B x V logits of the reference model every ARM is measured against (f32, device; unused when J = 0).
    pub reference: DevPtr,
    /// B x J weights (host), finite and >= 0.
    pub weights: &'a [f32],
    /// B temperatures tau (host), finite and > 0.
    pub tau: &'a [f32],
    /// Greedy or sampled choice.
    pub choice: Choice,
    /// Sampling seed.
    pub seed: u64,
    /// Decoding step (with the row, the key of the draws).
    pub step: u32,
}

/// The buffers of [`Gpu::decode_step_device`] besides the candidates' (those of [`Gpu::candidates`]).
#[derive(Default)]
pub(super) struct StepBuffers {
    /// At least B x k zeros: the one principal of value 0 when J = 0 (uploaded when it grows, not each step).
    zero: DevBuf,
    values: DevBuf,
    weights: DevBuf,
    tau: DevBuf,
    pi: DevBuf,
    agg: DevBuf,
    payoff: DevBuf,
    stats: DevBuf,
    tokens: DevBuf,
}

/// What [`Gpu::decode_step_device`] hands back.
#[derive(Clone, Debug, PartialEq)]
pub struct StepOutput {
    /// B chosen token ids.
    pub tokens: Vec<u32>,
    /// B equilibrium passes per row.
    pub iterations: Vec<u32>,
    /// B flags: whether the row's equilibrium met the tolerance (else its token comes from the last iterate,
    /// as on the host paths, which report the same flag in their solutions).
    pub converged: Vec<bool>,
}

impl Gpu {
    /// One decoding step on device-resident logits (see the module documentation). The values are always
    /// `shift_min`-normalised, which makes them >= 0 as the game requires; the host path
    /// ([`Gpu::principal_values`]) is the one for `none`. Device data cannot be checked before the kernels
    /// read it, so the checks come after: a row whose equilibrium residual is not finite (NaN logits) or whose
    /// choice found no candidate is an error naming the row.
    ///
    /// # Safety
    /// `logits` must hold B x V f32 values, and when J > 0 `arm` B x J x V and `reference` B x V, all device
    /// memory of this `Gpu`'s device, unchanged until the call returns (it waits for the kernels).
    pub unsafe fn decode_step_device(&mut self, s: &DeviceStep<'_>) -> Result<StepOutput> {
        let (b, v, j, k) = (s.rows, s.vocab, s.principals, s.k);
        // Rows, vocabulary, k and the logits pointer are checked by prepare_candidates_device, before any launch.
        if j > MAX_PRINCIPALS {
            return Err(bad(format!("the CUDA equilibrium supports up to {MAX_PRINCIPALS} principals, got {j}")));
        }
        check_i32("rows x principals", b.saturating_mul(j.max(1)))?;
        if s.weights.len() != b * j {
            return Err(CageError::Shape { what: "weights".into(), expected: b * j, got: s.weights.len() });
        }
        if let Some((i, w)) = s.weights.iter().enumerate().find(|(_, w)| !(w.is_finite() && **w >= 0.0)) {
            return Err(CageError::BadWeight { principal: format!("{}", i % j.max(1)), value: *w as f64 });
        }
        if s.tau.len() != b {
            return Err(CageError::Shape { what: "tau".into(), expected: b, got: s.tau.len() });
        }
        if let Some(&t) = s.tau.iter().find(|t| !crate::problem::valid_tau(**t)) {
            return Err(CageError::BadTau(t as f64));
        }
        for (what, p) in [("ARM logits", s.arm), ("reference logits", s.reference)] {
            if p == 0 && j > 0 {
                return Err(bad(format!("device pointer to the {what} is null")));
            }
        }

        // Candidates: ids and log pi0.
        // SAFETY: the caller vouches for the logits.
        let cands = unsafe { self.prepare_candidates_device(s.logits, b, v, Some(k)) }?;
        self.run_candidates(&cands)?;

        // The principals' values at the candidates (J = 0: one principal of value 0, who never pays).
        let j_eff = j.max(1);
        let (dev, bufs) = (self.dev.as_mut(), &mut self.step);
        let values = if j == 0 {
            // Uploaded only when it grows: nothing writes it, so a larger earlier shape's zeros serve.
            if bufs.zero.ptr() == 0 || bufs.zero.bytes() < b * k * 4 {
                bufs.zero.upload_staged(dev, &vec![0f32; b * k])?
            } else {
                bufs.zero.ptr()
            }
        } else {
            let args = ValuesArgs {
                tag: "f32",
                arm: s.arm,
                reference: s.reference,
                ref_per_principal: false,
                rows: b,
                j,
                v,
                k,
                ids: cands.ids,
                base: cands.logp,
                weights: bufs.weights.upload_staged(dev, s.weights)?,
                shift_min: true,
                out: bufs.values.reserve(dev, b * j * k * 4)?,
            };
            // SAFETY: the caller vouches for the ARM and reference logits; the other buffers are sized above.
            unsafe { self.launch_values(&args)? };
            args.out
        };

        // The equilibrium over the candidates.
        let opts = EqOptions { values: ValueType::F32, incentives: false, ..EqOptions::default() };
        let shape = self.equilibrium_shape(k, j_eff, &opts)?;
        let (dev, bufs) = (self.dev.as_mut(), &mut self.step);
        let job = EqJob {
            rows: b,
            n: k,
            j,
            j_eff,
            opts,
            shape,
            base: cands.logp,
            values,
            tau: bufs.tau.upload_staged(dev, s.tau)?,
            out: SolutionAt {
                pi: bufs.pi.reserve(dev, b * k * 4)?,
                agg: bufs.agg.reserve(dev, b * k * 4)?,
                y: 0,
                payoff: bufs.payoff.reserve(dev, b * j_eff * 4)?,
                stats: bufs.stats.reserve(dev, b * 3 * 4)?,
            },
            // Launched right here on the step's own buffers: nothing to check later.
            generation: 0,
        };
        let tokens = bufs.tokens.reserve(dev, b * 4)?;
        self.launch_equilibrium(&job, 0)?;

        // The token.
        let choose = ChooseArgs {
            pi: job.out.pi,
            rows: b,
            n: k,
            ids: cands.ids,
            choice: s.choice,
            seed: s.seed,
            step: s.step,
            step_at: 0,
            keys: 0,
            tokens,
        };
        // SAFETY: buffers sized above on this device.
        unsafe { self.launch_choose(&choose)? };

        let tokens: Vec<u32> = self.download(tokens, b)?;
        let stats: Vec<f32> = self.download(job.out.stats, b * 3)?;
        for r in 0..b {
            let residual = stats[r * 3 + 1];
            if !residual.is_finite() {
                return Err(CageError::NonFinite {
                    what: format!("equilibrium of row {r} (NaN or infinite logits, ARM or reference logits)"),
                    index: r,
                    value: format!("{residual}"),
                });
            }
            if tokens[r] as usize >= v {
                return Err(CageError::EmptyCandidates { row: r });
            }
        }
        Ok(StepOutput {
            tokens,
            iterations: (0..b).map(|r| stats[r * 3] as u32).collect(),
            converged: (0..b).map(|r| stats[r * 3 + 2] != 0.0).collect(),
        })
    }
}
