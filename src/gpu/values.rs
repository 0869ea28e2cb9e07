//! Host side of kernels/values.cu: the principals' values at the candidates, q = log pi_ARM - log pi_ref (the
//! implicit reward of an autoregressive reward model, both log-softmaxed over the full vocabulary), with the
//! batch preprocessing (`shift_min` or `none`, then the weight) fused in. [`Gpu::principal_values`]. Each
//! distinct logit row's log-sum-exp is computed once, by its own launch, before the gather.

use super::candidates::{Candidates, Logits};
use super::device::{DevBuf, DevPtr};
use super::{Gpu, Launch, bad};
use crate::error::{CageError, Result};
use crate::problem::Normalize;

/// The buffers of [`Gpu::principal_values`].
#[derive(Default)]
pub(super) struct ValueBuffers {
    arm: DevBuf,
    reference: DevBuf,
    ids: DevBuf,
    base: DevBuf,
    weights: DevBuf,
    out: DevBuf,
    /// Slice log-sum-exps of the ARM and reference rows (and of the resident step's stream rows).
    lse_arm: DevBuf,
    lse_ref: DevBuf,
    lse_streams: DevBuf,
}

/// What `cage_values_{tag}` reads and writes, all on the device.
#[derive(Clone, Copy, Debug)]
pub(super) struct ValuesArgs {
    /// The logits' type (the kernel's suffix).
    pub(super) tag: &'static str,
    /// B x J x V ARM logits.
    pub(super) arm: DevPtr,
    /// Reference logits: B x J x V when `ref_per_principal`, else B x V shared by the principals.
    pub(super) reference: DevPtr,
    pub(super) ref_per_principal: bool,
    /// B, J, V and k.
    pub(super) rows: usize,
    pub(super) j: usize,
    pub(super) v: usize,
    pub(super) k: usize,
    /// B x k candidate ids and base log-probabilities (-inf: excluded, value 0).
    pub(super) ids: DevPtr,
    pub(super) base: DevPtr,
    /// B x J weights.
    pub(super) weights: DevPtr,
    /// `shift_min` (else `none`).
    pub(super) shift_min: bool,
    /// B x J x k values out.
    pub(super) out: DevPtr,
}

/// What `cage_values_streams` reads and writes (the resident step's values), all on the device.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct StreamValuesArgs {
    /// B rows.
    pub(super) rows: usize,
    /// B x S row addresses of f32 logits (V each).
    pub(super) table: DevPtr,
    pub(super) streams: usize,
    /// J pairs of ints: (stream, reference stream), or (-1, lexicon row).
    pub(super) pairs: DevPtr,
    /// L x V lexicon scores, or 0.
    pub(super) lexicon: DevPtr,
    pub(super) j: usize,
    pub(super) v: usize,
    /// B x k candidate ids and log pi0.
    pub(super) ids: DevPtr,
    pub(super) k: usize,
    pub(super) base: DevPtr,
    /// B x J weights.
    pub(super) weights: DevPtr,
    pub(super) shift_min: bool,
    /// B x J x k raw values, preprocessed values and (or 0) own log-probabilities out.
    pub(super) raw: DevPtr,
    pub(super) values: DevPtr,
    pub(super) own: DevPtr,
}

impl Gpu {
    /// Principal values at the candidates, preprocessed as the batch expects: for each row r and principal j,
    /// q = (arm_j - lse(arm_j)) - (ref_j - lse(ref_j)) gathered at `ids`, then `shift_min` over the candidates
    /// whose `base` log-probability is finite, then the weight; 0 at excluded candidates.
    /// `arm` and `reference` are B x J x V logits (`reference` may be B x V, shared by every principal).
    #[allow(clippy::too_many_arguments)]
    pub fn principal_values(
        &mut self,
        arm: Logits<'_>,
        reference: Logits<'_>,
        rows: usize,
        principals: usize,
        vocab: usize,
        cands: &Candidates,
        base: &[f32],
        weights: &[f32],
        normalize: Normalize,
    ) -> Result<Vec<f32>> {
        let (b, j, v, k) = (rows, principals, vocab, cands.k);
        if j == 0 {
            return Ok(Vec::new());
        }
        if arm.tag() != reference.tag() {
            return Err(bad(format!("ARM logits are {} but reference logits are {}", arm.tag(), reference.tag())));
        }
        arm.check(b * j, v)?;
        let shared_ref = reference.len() == b * v;
        reference.check(if shared_ref { b } else { b * j }, v)?;
        if cands.ids.len() != b * k || base.len() != b * k {
            return Err(CageError::Shape {
                what: "candidate ids / base".into(),
                expected: b * k,
                got: cands.ids.len().min(base.len()),
            });
        }
        if weights.len() != b * j {
            return Err(CageError::Shape { what: "weights".into(), expected: b * j, got: weights.len() });
        }
        if let Some((i, w)) = weights.iter().enumerate().find(|(_, w)| !(w.is_finite() && **w >= 0.0)) {
            return Err(CageError::BadWeight { principal: format!("{}", i % j), value: *w as f64 });
        }
        if let Some(&id) = cands.ids.iter().find(|&&id| id as usize >= v) {
            return Err(bad(format!("token id {id} is outside a vocabulary of {v}")));
        }
        let (dev, bufs) = (self.dev.as_mut(), &mut self.values);
        let args = ValuesArgs {
            tag: arm.tag(),
            arm: bufs.arm.upload(dev, arm.bytes())?,
            reference: bufs.reference.upload(dev, reference.bytes())?,
            ref_per_principal: !shared_ref,
            rows: b,
            j,
            v,
            k,
            ids: bufs.ids.upload(dev, &cands.ids)?,
            base: bufs.base.upload(dev, base)?,
            weights: bufs.weights.upload(dev, weights)?,
            shift_min: normalize == Normalize::ShiftMin,
            out: bufs.out.reserve(dev, b * j * k * 4)?,
        };
        // SAFETY: the buffers were sized above on this device.
        unsafe { self.launch_values(&args)? };
        let vals: Vec<f32> = self.download(args.out, b * j * k)?;
        // -inf ARM logits at a candidate make q infinite: the game needs finite values.
        if let Some((i, x)) = vals.iter().enumerate().find(|(_, x)| !x.is_finite()) {
            return Err(CageError::NonFinite {
                what: "principal values (ARM or reference log-probabilities)".into(),
                index: i,
                value: format!("{x}"),
            });
        }
        if normalize == Normalize::None {
            for r in 0..b {
                for p in 0..j {
                    for c in 0..k {
                        let x = vals[(r * j + p) * k + c];
                        if x < 0.0 && base[r * k + c] != f32::NEG_INFINITY {
                            return Err(CageError::NegativeValue {
                                row: r,
                                principal: format!("{p}"),
                                index: c,
                                value: x as f64,
                            });
                        }
                    }
                }
            }
        }
        Ok(vals)
    }

    /// Launches the log-sum-exps of the ARM rows and of the distinct reference rows (`cage_lse_part_{tag}`,
    /// rows split over several blocks at small batch: [`super::row_split`]), then `cage_values_{tag}`
    /// (kernels/values.cu), one block per (row, principal), which merges them and reads the candidates only.
    ///
    /// # Safety
    /// Every pointer of `a` must be device memory of this `Gpu` holding the stated number of elements.
    pub(super) unsafe fn launch_values(&mut self, a: &ValuesArgs) -> Result<()> {
        let ref_rows = if a.ref_per_principal { a.rows * a.j } else { a.rows };
        let (chunk, parts) = super::row_split(a.rows * a.j + ref_rows, a.v, None).unwrap_or((a.v, 1));
        let (dev, bufs) = (self.dev.as_mut(), &mut self.values);
        let lse_arm = bufs.lse_arm.reserve(dev, a.rows * a.j * parts * 4)?;
        let lse_ref = bufs.lse_ref.reserve(dev, ref_rows * parts * 4)?;
        let lse = format!("cage_lse_part_{}", a.tag);
        for (x, rows, out) in [(a.arm, a.rows * a.j, lse_arm), (a.reference, ref_rows, lse_ref)] {
            let launch =
                Launch::new(&lse).grid((rows * parts) as u32).row_block(chunk).ptr(x).i32(a.v as i32).i32(chunk as i32);
            // SAFETY: cage_lse_part_* (logits, v, chunk, part): `x` holds rows x V logits (the caller's word),
            // `out` rows x parts floats (reserved above).
            unsafe { launch.ptr(out).run(self.dev.as_mut())? };
        }
        let name = format!("cage_values_{}", a.tag);
        let launch = Launch::new(&name)
            .grid((a.rows * a.j) as u32)
            .block(a.k.next_multiple_of(32).clamp(32, 1024) as u32)
            .ptr(a.arm)
            .ptr(a.reference)
            .i32(i32::from(a.ref_per_principal))
            .i32(a.j as i32)
            .i32(a.v as i32)
            .ptr(a.ids)
            .i32(a.k as i32)
            .ptr(a.base)
            .ptr(a.weights)
            .i32(i32::from(a.shift_min))
            .ptr(a.out)
            .ptr(lse_arm)
            .ptr(lse_ref)
            .i32(parts as i32);
        // SAFETY: the arguments follow VALUES_PARAMS in kernels/values.cu; the caller vouches for the buffers.
        unsafe { launch.run(self.dev.as_mut()) }
    }

    /// Launches `cage_values_streams` (kernels/values.cu): one block per (row, principal).
    ///
    /// # Safety
    /// Every pointer of `a` must be device memory this `Gpu` can read or write holding the stated number of
    /// elements, the table's addresses included; the pairs must name streams below S and lexicon rows present.
    pub(super) unsafe fn launch_values_streams(&mut self, a: &StreamValuesArgs) -> Result<()> {
        // The log-sum-exp of every stream row a principal reads as logits, once each (cage_lse_streams skips the
        // others); the buffer only grows, so a step that repeats its shapes allocates nothing.
        let (chunk, parts) = super::row_split(a.rows * a.streams, a.v, None).unwrap_or((a.v, 1));
        let part = self.values.lse_streams.reserve(self.dev.as_mut(), a.rows * a.streams * parts * 4)?;
        let lse = Launch::new("cage_lse_streams")
            .grid((a.rows * a.streams * parts) as u32)
            .row_block(chunk)
            .ptr(a.table)
            .i32(a.streams as i32)
            .ptr(a.pairs)
            .i32(a.j as i32)
            .i32(a.v as i32)
            .i32(chunk as i32)
            .ptr(part);
        // SAFETY: the arguments follow cage_lse_streams in kernels/values.cu; `part` holds B x S x parts floats,
        // the caller vouches for the rest.
        unsafe { lse.run(self.dev.as_mut())? };
        let launch = Launch::new("cage_values_streams")
            .grid((a.rows * a.j) as u32)
            .block(a.k.next_multiple_of(32).clamp(32, 1024) as u32)
            .ptr(a.table)
            .i32(a.streams as i32)
            .ptr(a.pairs)
            .ptr(a.lexicon)
            .i32(a.j as i32)
            .i32(a.v as i32)
            .ptr(a.ids)
            .i32(a.k as i32)
            .ptr(a.base)
            .ptr(a.weights)
            .i32(i32::from(a.shift_min))
            .ptr(a.raw)
            .ptr(a.values)
            .ptr(a.own)
            .ptr(part)
            .i32(parts as i32);
        // SAFETY: the arguments follow cage_values_streams in kernels/values.cu; the caller vouches for the buffers.
        unsafe { launch.run(self.dev.as_mut()) }
    }
}
