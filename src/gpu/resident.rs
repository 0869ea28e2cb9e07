//! A decoding step resident on the device, for the engine's loop: every stream's logits stay where the forward
//! passes left them (rows addressed through a table, so streams of other models' decoders are read in place),
//! and the chain runs back to back on one device: candidates ([`Gpu::candidates`]'s kernel), the principals'
//! values from per-principal stream pairs or a lexicon's score vector (`cage_values_streams`), the method's
//! policy (the exact equilibrium for `cage`, kernels/policy.cu for the others), the token choice, and the
//! report. Only the report crosses to the host: per row the token and the principals' raw values there,
//! (1 + J) x 4 bytes. The host uploads the token ids of the next forward, and the tables below only when they
//! change (the row table when the live rows change, the weights when the rows do, the lexicon once), all by
//! staged copies that do not wait: the report's download is the step's one wait.
//!
//! The step comes in three parts so that its launches can be captured as a graph (`decode::resident` does):
//! [`Gpu::resident_prepare`] (checks, uploads, buffers: everything the launches read, [`ResidentLaunch`]),
//! [`Gpu::resident_launch`] (kernels and device copies only) and [`Gpu::resident_finish`] (the download).

use super::choose::ChooseArgs;
use super::device::{DevBuf, DevPtr, Device};
use super::equilibrium::{EqJob, EqOptions, MAX_PRINCIPALS, SolutionAt, ValueType};
use super::policy::{DevicePolicy, REPORT_NO_CANDIDATE, REPORT_NOT_FINITE, ReportArgs};
use super::values::StreamValuesArgs;
use super::{Gpu, bad, check_i32};
use crate::error::{CageError, Result};
use crate::sampling::Choice;

/// Where a principal's values come from on the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrincipalStreams {
    /// q = log pi(stream `of`) - log pi(stream `against`) (indices into a row's streams): an ARM against its
    /// reference, a prompted stream against its plain one.
    Ratio {
        /// The ARM's (or the instructed) stream.
        of: usize,
        /// The reference stream.
        against: usize,
    },
    /// q = row `row` of the lexicon table at the candidate's id.
    Lexicon {
        /// The row of the table.
        row: usize,
    },
}

/// The method of a resident step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResidentMethod {
    /// The exact equilibrium (`cage`).
    Equilibrium,
    /// A policy of kernels/policy.cu.
    Policy(DevicePolicy),
    /// A policy only the host computes (`cage-paper`, the authors' L-BFGS-B solver): the step stops after the
    /// values and hands back the candidates, log pi0 and the raw values, k x (2 + J) numbers per row, for the
    /// host's policy and choice.
    Host,
}

/// Inputs of [`Gpu::resident_step`].
#[derive(Clone, Copy, Debug)]
pub struct ResidentStep<'a> {
    /// B rows.
    pub rows: usize,
    /// S streams per row; stream 0 is the base model's (its logits give the candidates).
    pub streams: usize,
    /// V, every stream's row width.
    pub vocab: usize,
    /// Candidates per row (1 to [`MAX_TOP_K`](super::MAX_TOP_K), at most V).
    pub k: usize,
    /// B x S device addresses of f32 logits rows (V each), row-major: any device memory of this device's
    /// context (other decoders' logits included).
    pub table: &'a [DevPtr],
    /// J principals' sources.
    pub principals: &'a [PrincipalStreams],
    /// L x V lexicon scores (host; uploaded when they change, so once per run).
    pub lexicon: &'a [f32],
    /// B x J weights, finite and >= 0.
    pub weights: &'a [f32],
    /// The agent's temperature.
    pub tau: f32,
    /// Values preprocessed by `shift_min` (else `none`: the caller guarantees values >= 0).
    pub shift_min: bool,
    /// The method.
    pub method: ResidentMethod,
    /// Greedy or sampled choice, the draws keyed by (seed, row key, step).
    pub choice: Choice,
    /// B row numbers keying the draws (a row's index in the decode call, whatever rows stopped before it).
    pub keys: &'a [u32],
    /// Sampling seed.
    pub seed: u64,
    /// The decoding step.
    pub step: u32,
}

/// A device buffer and the host copy of what it holds: [`Mirror::sync`] uploads only when the data changed.
#[derive(Default)]
struct Mirror<T> {
    buf: DevBuf,
    host: Vec<T>,
}

impl<T: bytemuck::Pod + PartialEq> Mirror<T> {
    fn sync(&mut self, dev: &mut dyn Device, data: &[T]) -> Result<DevPtr> {
        if self.buf.ptr() == 0 || self.host != data {
            self.host.clear();
            self.host.extend_from_slice(data);
            self.buf.upload_staged(dev, data)?;
        }
        Ok(self.buf.ptr())
    }

    /// [`Mirror::sync`] of `n` copies of `x`, without building them on the host unless they changed.
    fn fill(&mut self, dev: &mut dyn Device, x: T, n: usize) -> Result<DevPtr> {
        if self.buf.ptr() == 0 || self.host.len() != n || self.host.iter().any(|h| *h != x) {
            self.host.clear();
            self.host.resize(n, x);
            self.buf.upload_staged(dev, &self.host)?;
        }
        Ok(self.buf.ptr())
    }
}

/// The buffers of [`Gpu::resident_step`], grown only when a shape grows.
#[derive(Default)]
pub(super) struct ResidentBuffers {
    table: Mirror<u64>,
    pairs: Mirror<i32>,
    lexicon: Mirror<f32>,
    weights: Mirror<f32>,
    tau: Mirror<f32>,
    keys: Mirror<u32>,
    /// B x k zeros: the one principal of value 0 of an equilibrium without principals.
    zeros: Mirror<f32>,
    /// B x V base logits, gathered when the base rows are not contiguous.
    base: DevBuf,
    raw: DevBuf,
    values: DevBuf,
    own: DevBuf,
    pi: DevBuf,
    agg: DevBuf,
    payoff: DevBuf,
    stats: DevBuf,
    tokens: DevBuf,
    report: DevBuf,
    /// The step of a sampled choice, read by the kernel (so that a graph replays each step's draws).
    step: DevBuf,
    /// The host copy of the report.
    host_report: Vec<u32>,
    pairs_host: Vec<i32>,
    /// The launches of the step prepared last.
    launch: ResidentLaunch,
}

/// The method's part of a [`ResidentLaunch`].
#[derive(Clone, Copy, Debug, Default, PartialEq)]
enum MethodLaunch {
    /// A policy of kernels/policy.cu.
    Policy(super::policy::PolicyArgs),
    /// The exact equilibrium.
    Equilibrium(EqJob),
    /// No policy on the device: the step ends after the values.
    #[default]
    Host,
}

/// Everything the launches of a resident step read: device addresses and the kernels' scalar parameters. Two
/// steps with equal launches enqueue the same kernels with the same parameters, everything else that differs
/// between them lives in device memory; which is what lets a captured graph stand for the step (see
/// [`Gpu::resident_launch`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ResidentLaunch {
    rows: usize,
    vocab: usize,
    j: usize,
    /// B x V gathered base rows and the rows they are copied from (empty: the base rows are contiguous and read
    /// in place).
    gather: DevPtr,
    gather_from: Vec<DevPtr>,
    cands: Option<super::CandJob>,
    values: Option<StreamValuesArgs>,
    method: MethodLaunch,
    choose: Option<ChooseArgs>,
    report: Option<ReportArgs>,
    /// With [`ResidentMethod::Host`]: B x J x k raw values to hand back.
    raw: DevPtr,
}

/// What [`Gpu::resident_step`] hands back, kept by the caller from step to step.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ResidentReport {
    /// B chosen token ids.
    pub tokens: Vec<u32>,
    /// B x J raw values q_j at the chosen tokens.
    pub values: Vec<f32>,
    /// With [`ResidentMethod::Host`] (and then no tokens): B x k candidate ids, B x k log pi0 and B x J x k raw
    /// values.
    pub ids: Vec<u32>,
    /// See `ids`.
    pub logp: Vec<f32>,
    /// See `ids`.
    pub raw: Vec<f32>,
}

impl Gpu {
    /// One resident decoding step (see the module documentation); fills `out`. Device data cannot be checked
    /// before the kernels read it, so the checks come after, from the report: a row with a non-finite value or
    /// equilibrium residual, or without a candidate, is an error naming the row.
    ///
    /// # Safety
    /// Every address of `table` must point at V f32 values of device memory this device can read, unchanged
    /// until the call returns (it waits for the kernels).
    pub unsafe fn resident_step(&mut self, s: &ResidentStep<'_>, out: &mut ResidentReport) -> Result<()> {
        // SAFETY: forwarded contract.
        unsafe {
            self.resident_prepare(s)?;
            self.resident_launch()?;
        }
        self.resident_finish(out)
    }

    /// The first part of [`Gpu::resident_step`]: checks the step, uploads what changed (tables, weights, the
    /// step of a sampled choice: staged copies, no wait) and sizes the buffers; the launches are then
    /// [`Gpu::resident_launches`].
    ///
    /// # Safety
    /// As for [`Gpu::resident_step`], until [`Gpu::resident_finish`] returns.
    pub unsafe fn resident_prepare(&mut self, s: &ResidentStep<'_>) -> Result<()> {
        let (b, ns, v, k, j) = (s.rows, s.streams, s.vocab, s.k, s.principals.len());
        if b == 0 || ns == 0 || v == 0 {
            return Err(bad(format!("a resident step of {b} rows, {ns} streams, vocabulary {v}: all must be >= 1")));
        }
        if s.table.len() != b * ns {
            return Err(CageError::Shape { what: "stream table".into(), expected: b * ns, got: s.table.len() });
        }
        if let Some(i) = s.table.iter().position(|&p| p == 0) {
            return Err(bad(format!("stream table entry {i} (row {}, stream {}) is null", i / ns, i % ns)));
        }
        if j > MAX_PRINCIPALS {
            return Err(bad(format!("the resident step supports up to {MAX_PRINCIPALS} principals, got {j}")));
        }
        check_i32("rows x streams x vocabulary", b * ns * v)?;
        if s.keys.len() != b {
            return Err(CageError::Shape { what: "row keys".into(), expected: b, got: s.keys.len() });
        }
        if s.weights.len() != b * j {
            return Err(CageError::Shape { what: "weights".into(), expected: b * j, got: s.weights.len() });
        }
        if let Some((i, w)) = s.weights.iter().enumerate().find(|(_, w)| !(w.is_finite() && **w >= 0.0)) {
            return Err(CageError::BadWeight { principal: format!("{}", i % j.max(1)), value: *w as f64 });
        }
        if !crate::problem::valid_tau(s.tau) {
            return Err(CageError::BadTau(s.tau as f64));
        }
        if !s.lexicon.len().is_multiple_of(v) {
            return Err(CageError::Shape { what: "lexicon table".into(), expected: v, got: s.lexicon.len() % v });
        }
        if s.method == ResidentMethod::Policy(DevicePolicy::Mod) && j == 0 {
            return Err(bad("MOD needs at least one principal".into()));
        }
        let bufs = &mut self.resident;
        bufs.pairs_host.clear();
        for (p, src) in s.principals.iter().enumerate() {
            let pair = match *src {
                PrincipalStreams::Ratio { of, against } if of < ns && against < ns => [of as i32, against as i32],
                PrincipalStreams::Lexicon { row } if row < s.lexicon.len() / v => [-1, row as i32],
                src => return Err(bad(format!("principal {p}: {src:?} is outside {ns} streams and the lexicon"))),
            };
            bufs.pairs_host.extend(pair);
        }
        let mut l = std::mem::take(&mut bufs.launch);
        l.rows = b;
        l.vocab = v;
        l.j = j;

        // The base rows, contiguous for the candidates kernel: in place when they are, else gathered.
        let dev = self.dev.as_mut();
        let stride = (v * 4) as DevPtr;
        let contiguous = (0..b).all(|r| s.table[r * ns] == s.table[0] + r as DevPtr * stride);
        l.gather_from.clear();
        let base = if contiguous {
            l.gather = 0;
            s.table[0]
        } else {
            l.gather = bufs.base.reserve(dev, b * v * 4)?;
            l.gather_from.extend((0..b).map(|r| s.table[r * ns]));
            l.gather
        };
        // SAFETY: the caller vouches for the logits; a gathered copy is B x V here.
        let cands = unsafe { self.prepare_candidates_device(base, b, v, Some(k)) }?;
        l.cands = Some(cands);

        // The values.
        let (dev, bufs) = (self.dev.as_mut(), &mut self.resident);
        let table = bufs.table.sync(dev, s.table)?;
        let pairs = bufs.pairs.sync(dev, &bufs.pairs_host)?;
        let lexicon = if s.lexicon.is_empty() { 0 } else { bufs.lexicon.sync(dev, s.lexicon)? };
        let weights = bufs.weights.sync(dev, s.weights)?;
        let jk = b * j.max(1) * k * 4;
        let (raw, values) = (bufs.raw.reserve(dev, jk)?, bufs.values.reserve(dev, jk)?);
        let own = match s.method {
            ResidentMethod::Policy(DevicePolicy::Genarm | DevicePolicy::Mod) => bufs.own.reserve(dev, jk)?,
            _ => 0,
        };
        l.values = (j > 0).then_some(StreamValuesArgs {
            rows: b,
            table,
            streams: ns,
            pairs,
            lexicon,
            j,
            v,
            ids: cands.ids,
            k,
            base: cands.logp,
            weights,
            shift_min: s.shift_min,
            raw,
            values,
            own,
        });
        l.raw = raw;

        // The policy.
        let pi = bufs.pi.reserve(dev, b * k * 4)?;
        let tokens = bufs.tokens.reserve(dev, b * 4)?;
        let report = bufs.report.reserve(dev, b * (1 + j) * 4)?;
        let stats = match s.method {
            ResidentMethod::Policy(policy) => {
                l.method = MethodLaunch::Policy(super::policy::PolicyArgs {
                    policy,
                    rows: b,
                    j,
                    k,
                    logp: cands.logp,
                    values,
                    own,
                    weights,
                    tau: s.tau,
                    pi,
                });
                0
            }
            ResidentMethod::Host => {
                l.method = MethodLaunch::Host;
                l.choose = None;
                l.report = None;
                self.resident.launch = l;
                return Ok(());
            }
            ResidentMethod::Equilibrium => {
                let j_eff = j.max(1);
                let opts = EqOptions { values: ValueType::F32, incentives: false, ..EqOptions::default() };
                let shape = self.equilibrium_shape(k, j_eff, &opts)?;
                let (dev, bufs) = (self.dev.as_mut(), &mut self.resident);
                // J = 0: one principal of value 0, who never pays.
                let values = if j == 0 { bufs.zeros.fill(dev, 0.0, b * k)? } else { values };
                let job = EqJob {
                    rows: b,
                    n: k,
                    j,
                    j_eff,
                    opts,
                    shape,
                    base: cands.logp,
                    values,
                    tau: bufs.tau.fill(dev, s.tau, b)?,
                    out: SolutionAt {
                        pi,
                        agg: bufs.agg.reserve(dev, b * k * 4)?,
                        y: 0,
                        payoff: bufs.payoff.reserve(dev, b * j_eff * 4)?,
                        stats: bufs.stats.reserve(dev, b * 3 * 4)?,
                    },
                    // Launched by this step on its own buffers: nothing to check later.
                    generation: 0,
                };
                l.method = MethodLaunch::Equilibrium(job);
                job.out.stats
            }
        };

        // The token and the report. A sampled choice reads its step from the device (a greedy one has none).
        let (dev, bufs) = (self.dev.as_mut(), &mut self.resident);
        let keys = bufs.keys.sync(dev, s.keys)?;
        let step_at = match s.choice {
            Choice::Greedy => 0,
            _ => {
                let p = bufs.step.reserve(dev, 4)?;
                dev.upload_staged(p, bytemuck::bytes_of(&s.step))?;
                p
            }
        };
        l.choose = Some(ChooseArgs {
            pi,
            rows: b,
            n: k,
            ids: cands.ids,
            choice: s.choice,
            seed: s.seed,
            step: 0,
            step_at,
            keys,
            tokens,
        });
        l.report = Some(ReportArgs { tokens, ids: cands.ids, rows: b, k, raw, j, stats, out: report });
        self.resident.launch = l;
        Ok(())
    }

    /// The launches [`Gpu::resident_prepare`] prepared: equal for two steps exactly when one's launches (a
    /// captured graph) can stand for the other's.
    pub fn resident_launches(&self) -> &ResidentLaunch {
        &self.resident.launch
    }

    /// Enqueues the prepared step's kernels (and the gather of the base rows), on the device's stream or into
    /// a graph being captured: no copy to or from the host, no wait.
    ///
    /// # Safety
    /// As for [`Gpu::resident_prepare`].
    pub unsafe fn resident_launch(&mut self) -> Result<()> {
        let l = std::mem::take(&mut self.resident.launch);
        // SAFETY: forwarded contract.
        let done = unsafe { self.enqueue_resident(&l) };
        self.resident.launch = l;
        done
    }

    /// See [`Gpu::resident_launch`].
    unsafe fn enqueue_resident(&mut self, l: &ResidentLaunch) -> Result<()> {
        let cands = l.cands.ok_or_else(|| bad("a resident launch before resident_prepare".into()))?;
        let stride = (l.vocab * 4) as DevPtr;
        for (r, &from) in l.gather_from.iter().enumerate() {
            self.dev.copy(l.gather + r as DevPtr * stride, from, l.vocab * 4)?;
        }
        self.run_candidates(&cands)?;
        if let Some(args) = &l.values {
            // SAFETY: the table's rows are the caller's, the pairs were checked against S and the lexicon's rows,
            // the other buffers sized by resident_prepare on this device.
            unsafe { self.launch_values_streams(args) }?;
        }
        match &l.method {
            // SAFETY: buffers sized by resident_prepare on this device.
            MethodLaunch::Policy(args) => unsafe { self.launch_policy(args)? },
            MethodLaunch::Equilibrium(job) => self.launch_equilibrium(job, 0)?,
            MethodLaunch::Host => return Ok(()),
        }
        if let (Some(choose), Some(rep)) = (&l.choose, &l.report) {
            // SAFETY: buffers sized by resident_prepare on this device.
            unsafe {
                self.launch_choose(choose)?;
                self.launch_report(rep)?;
            }
        }
        Ok(())
    }

    /// The last part of [`Gpu::resident_step`], after its launches (plain or a graph): the one download, which
    /// waits for them, and the checks of the report.
    pub fn resident_finish(&mut self, out: &mut ResidentReport) -> Result<()> {
        out.tokens.clear();
        out.values.clear();
        out.ids.clear();
        out.logp.clear();
        out.raw.clear();
        let l = &self.resident.launch;
        let (b, v, j) = (l.rows, l.vocab, l.j);
        let cands = l.cands.ok_or_else(|| bad("resident_finish before resident_prepare".into()))?;
        let Some(report) = l.report else {
            // A policy of the host: three downloads of k x (2 + J) numbers per row in all.
            let k = cands.ids_per_row();
            let raw = l.raw;
            out.ids.resize(b * k, 0);
            self.dev.download(cands.ids, bytemuck::cast_slice_mut(&mut out.ids))?;
            out.logp.resize(b * k, 0.0);
            self.dev.download(cands.logp, bytemuck::cast_slice_mut(&mut out.logp))?;
            out.raw.resize(b * j * k, 0.0);
            self.dev.download(raw, bytemuck::cast_slice_mut(&mut out.raw))?;
            return Ok(());
        };
        let words = b * (1 + j);
        let bufs = &mut self.resident;
        bufs.host_report.resize(words, 0);
        self.dev.download(report.out, bytemuck::cast_slice_mut(&mut bufs.host_report))?;

        for (r, w) in bufs.host_report.chunks_exact(1 + j).enumerate() {
            match w[0] {
                REPORT_NO_CANDIDATE => return Err(CageError::EmptyCandidates { row: r }),
                REPORT_NOT_FINITE => {
                    return Err(CageError::NonFinite {
                        what: format!("values or equilibrium of row {r} (NaN or infinite logits)"),
                        index: r,
                        value: "not finite".into(),
                    });
                }
                t if t as usize >= v => return Err(CageError::EmptyCandidates { row: r }),
                t => out.tokens.push(t),
            }
            out.values.extend(w[1..].iter().map(|&x| f32::from_bits(x)));
        }
        Ok(())
    }
}
