//! Host side of kernels/softmax_topk.cu: the candidates of every row from full-vocabulary logits (the top k
//! with log pi0 normalised over the row, or every token), the GPU version of `crate::candidates::select`.
//! [`Gpu::candidates`] from host logits, or its three steps (prepare, run, fetch), also on logits already on
//! the device ([`Gpu::prepare_candidates_device`]).

use super::device::{DevBuf, DevPtr};
use super::{Gpu, Launch, bad, check_i32};
use crate::error::{CageError, Result};

/// Largest k of the top-k kernel (larger candidate sets use the whole vocabulary).
pub const MAX_TOP_K: usize = 1024;

/// Blocks a launch should have before rows are split over several (about two per SM of an H100 / H200).
const TARGET_BLOCKS: usize = 256;
/// Fewest elements a slice of a split row gets: below that the extra launch and merge cost more than the
/// parallelism gains.
pub const MIN_SLICE: usize = 8192;
/// Entries (slices x k) the top-k merge holds on chip (TOPK_MERGE_MAX in kernels/softmax_topk.cu).
const TOPK_MERGE_MAX: usize = 4096;

/// How rows of `vocab` entries are read: `Some((chunk, parts))` cuts each row into `parts` slices of `chunk`
/// elements (a multiple of 8, so slices stay 16-byte aligned), one block each, when `rows` alone would leave
/// most of the GPU idle; `None` for one block per row. `k`: the top-k's k (its merge bounds parts x k).
pub fn row_split(rows: usize, vocab: usize, k: Option<usize>) -> Option<(usize, usize)> {
    let mut parts = TARGET_BLOCKS.div_ceil(rows.max(1)).min(vocab / MIN_SLICE);
    if let Some(k) = k {
        parts = parts.min(TOPK_MERGE_MAX / k.max(1));
    }
    if parts < 2 {
        return None;
    }
    let chunk = vocab.div_ceil(parts).next_multiple_of(8);
    let parts = vocab.div_ceil(chunk);
    (parts > 1).then_some((chunk, parts))
}

/// Full-vocabulary logits of B rows in one of the types language models emit.
#[derive(Clone, Copy, Debug)]
pub enum Logits<'a> {
    /// f32.
    F32(&'a [f32]),
    /// bf16.
    Bf16(&'a [half::bf16]),
    /// f16.
    F16(&'a [half::f16]),
}

impl Logits<'_> {
    pub(super) fn len(&self) -> usize {
        match self {
            Logits::F32(x) => x.len(),
            Logits::Bf16(x) => x.len(),
            Logits::F16(x) => x.len(),
        }
    }
    /// The suffix of the kernels for this type.
    pub(super) fn tag(&self) -> &'static str {
        match self {
            Logits::F32(_) => "f32",
            Logits::Bf16(_) => "bf16",
            Logits::F16(_) => "f16",
        }
    }
    pub(super) fn bytes(&self) -> &[u8] {
        match self {
            Logits::F32(x) => bytemuck::cast_slice(x),
            Logits::Bf16(x) => bytemuck::cast_slice(x),
            Logits::F16(x) => bytemuck::cast_slice(x),
        }
    }
    /// Entry `i` as f32.
    fn get(&self, i: usize) -> f32 {
        match self {
            Logits::F32(x) => x[i],
            Logits::Bf16(x) => x[i].to_f32(),
            Logits::F16(x) => x[i].to_f32(),
        }
    }

    /// Checks `rows` x `vocab` logits: the length, no NaN or +inf, and a finite logit in every row.
    pub(super) fn check(&self, rows: usize, vocab: usize) -> Result<()> {
        if rows == 0 || vocab == 0 {
            return Err(bad(format!("logits of {rows} rows x {vocab} tokens: both must be >= 1")));
        }
        if self.len() != rows * vocab {
            return Err(CageError::Shape { what: "logits".into(), expected: rows * vocab, got: self.len() });
        }
        check_i32("vocabulary size", vocab)?;
        for i in 0..self.len() {
            let x = self.get(i);
            if x.is_nan() || x == f32::INFINITY {
                return Err(CageError::NonFinite { what: "logits".into(), index: i, value: format!("{x}") });
            }
        }
        for r in 0..rows {
            if (0..vocab).all(|i| self.get(r * vocab + i) == f32::NEG_INFINITY) {
                return Err(CageError::EmptyCandidates { row: r });
            }
        }
        Ok(())
    }
}

/// The candidates of every row: ids and log pi0 (normalised over the full row), B x k, plus each row's
/// log-sum-exp.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidates {
    /// Candidates per row.
    pub k: usize,
    /// B x k token ids (top-k: most likely first, ties by lower id; all tokens: in id order).
    pub ids: Vec<u32>,
    /// B x k log pi0.
    pub logp: Vec<f32>,
    /// B log-sum-exp of the logits.
    pub lse: Vec<f32>,
}

/// The buffers of a candidate selection: the uploaded logits (host entry points only) and the outputs.
#[derive(Default)]
pub(super) struct CandBuffers {
    logits: DevBuf,
    logp: DevBuf,
    lse: DevBuf,
    ids: DevBuf,
    /// Split rows: each slice's log-sum-exp, and its sorted top-k keys and ids.
    part: DevBuf,
    part_keys: DevBuf,
    part_ids: DevBuf,
}

impl CandBuffers {
    /// Changes whenever one of the buffers a job uses is reallocated.
    fn generation(&self, own_logits: bool) -> u64 {
        let outputs = [&self.logp, &self.lse, &self.ids, &self.part, &self.part_keys, &self.part_ids]
            .iter()
            .map(|b| b.serial())
            .max()
            .unwrap_or(0);
        if own_logits { outputs.max(self.logits.serial()) } else { outputs }
    }
}

/// A candidate selection prepared on the device (see [`Gpu::prepare_candidates`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CandJob {
    rows: usize,
    vocab: usize,
    k: Option<usize>,
    tag: &'static str,
    x: DevPtr,
    pub(super) logp: DevPtr,
    lse: DevPtr,
    pub(super) ids: DevPtr,
    /// Rows split into slices (see [`row_split`]): (chunk, parts) and the slices' partials.
    split: Option<(usize, usize)>,
    part: DevPtr,
    part_keys: DevPtr,
    part_ids: DevPtr,
    /// [`CandBuffers::generation`] when prepared.
    generation: u64,
    /// Whether the logits are this family's upload (else the caller's device buffer).
    own_logits: bool,
}

impl CandJob {
    /// Candidates per row: k, or the whole vocabulary.
    pub(super) fn ids_per_row(&self) -> usize {
        self.k.unwrap_or(self.vocab)
    }

    /// Blocks per row of this selection (1: one block per row; more: split rows and a merge).
    pub fn blocks_per_row(&self) -> usize {
        self.split.map_or(1, |(_, parts)| parts)
    }

    /// Bytes one launch must move at least: the logits once, the candidates out.
    pub fn bytes_moved(&self) -> usize {
        let elem = if self.tag == "f32" { 4 } else { 2 };
        let kk = self.k.unwrap_or(self.vocab);
        self.rows * self.vocab * elem + self.rows * kk * if self.k.is_some() { 8 } else { 4 }
    }
}

impl Gpu {
    /// Candidates of every row from full-vocabulary logits: the top `k` (`Some(k)`, 1 <= k <= 1024) or every
    /// token (`None`), with log pi0 normalised over the whole row.
    pub fn candidates(
        &mut self,
        logits: Logits<'_>,
        rows: usize,
        vocab: usize,
        k: Option<usize>,
    ) -> Result<Candidates> {
        let job = self.prepare_candidates(logits, rows, vocab, k)?;
        self.run_candidates(&job)?;
        self.fetch_candidates(&job)
    }

    /// Validates and uploads logits for [`Gpu::run_candidates`].
    pub fn prepare_candidates(
        &mut self,
        logits: Logits<'_>,
        rows: usize,
        vocab: usize,
        k: Option<usize>,
    ) -> Result<CandJob> {
        logits.check(rows, vocab)?;
        check_k(k, vocab)?;
        let x = self.cand.logits.upload(self.dev.as_mut(), logits.bytes())?;
        self.candidate_outputs(rows, vocab, k, logits.tag(), x, true)
    }

    /// A candidate selection over f32 logits already on this device (`rows x vocab`, row-major), such as those
    /// of [`crate::model::gpu::GpuDecoder::forward_device`]: nothing is copied to the device.
    ///
    /// # Safety
    /// `logits` must be device memory of this device holding `rows x vocab` f32 values, unchanged until
    /// [`Gpu::run_candidates`] has run. They are not checked for NaN (the host path rejects those).
    pub unsafe fn prepare_candidates_device(
        &mut self,
        logits: DevPtr,
        rows: usize,
        vocab: usize,
        k: Option<usize>,
    ) -> Result<CandJob> {
        if rows == 0 || vocab == 0 || logits == 0 {
            return Err(bad(format!(
                "device logits of {rows} rows x {vocab} tokens at {logits:#x}: need rows, vocabulary >= 1 and a non-null pointer"
            )));
        }
        check_i32("vocabulary size", vocab)?;
        check_i32("rows", rows)?;
        check_k(k, vocab)?;
        self.candidate_outputs(rows, vocab, k, "f32", logits, false)
    }

    /// The job of a selection over the logits at `x`, its outputs allocated.
    fn candidate_outputs(
        &mut self,
        rows: usize,
        vocab: usize,
        k: Option<usize>,
        tag: &'static str,
        x: DevPtr,
        own_logits: bool,
    ) -> Result<CandJob> {
        let kk = k.unwrap_or(vocab);
        let split = row_split(rows, vocab, k);
        let (dev, b) = (self.dev.as_mut(), &mut self.cand);
        let (logp, lse, ids) =
            (b.logp.reserve(dev, rows * kk * 4)?, b.lse.reserve(dev, rows * 4)?, b.ids.reserve(dev, rows * kk * 4)?);
        let (mut part, mut part_keys, mut part_ids) = (0, 0, 0);
        if let Some((_, parts)) = split {
            part = b.part.reserve(dev, rows * parts * 4)?;
            if let Some(k) = k {
                part_keys = b.part_keys.reserve(dev, rows * parts * k * 4)?;
                part_ids = b.part_ids.reserve(dev, rows * parts * k * 4)?;
            }
        }
        let generation = b.generation(own_logits);
        Ok(CandJob { rows, vocab, k, tag, x, logp, lse, ids, split, part, part_keys, part_ids, generation, own_logits })
    }

    /// A job whose buffers a later, larger prepare reallocated would read and write freed memory: an error.
    fn check_candidates_generation(&self, job: &CandJob) -> Result<()> {
        if job.generation != self.cand.generation(job.own_logits) {
            return Err(bad(format!(
                "this candidate selection ({} rows x {} tokens) was prepared before a larger one reallocated its \
                 device buffers: prepare it again",
                job.rows, job.vocab
            )));
        }
        Ok(())
    }

    /// Launches a prepared candidate selection.
    pub fn run_candidates(&mut self, job: &CandJob) -> Result<()> {
        self.check_candidates_generation(job)?;
        let (tag, v) = (job.tag, job.vocab);
        if let Some((chunk, parts)) = job.split {
            return self.run_candidates_split(job, chunk, parts);
        }
        let name = match job.k {
            Some(_) => format!("cage_topk_{tag}"),
            None => format!("cage_logsoftmax_{tag}"),
        };
        let mut launch = Launch::new(&name).grid(job.rows as u32).row_block(v).ptr(job.x).i32(v as i32);
        launch = match job.k {
            Some(k) => launch.i32(k as i32).ptr(job.ids),
            None => launch,
        };
        // SAFETY: the arguments follow cage_topk_* (logits, v, k, ids, logp, lse) or cage_logsoftmax_* (logits,
        // v, logp, lse) in kernels/softmax_topk.cu; the buffers were sized by prepare_candidates.
        unsafe { launch.ptr(job.logp).ptr(job.lse).run(self.dev.as_mut()) }
    }

    /// Rows cut into `parts` slices of `chunk`: the slices' partials (log-sum-exp; top k), then the merge.
    fn run_candidates_split(&mut self, job: &CandJob, chunk: usize, parts: usize) -> Result<()> {
        let (tag, v, grid) = (job.tag, job.vocab, (job.rows * parts) as u32);
        let dev = self.dev.as_mut();
        match job.k {
            Some(k) => {
                let name = format!("cage_topk_part_{tag}");
                let part = Launch::new(&name).grid(grid).row_block(chunk).ptr(job.x).i32(v as i32).i32(chunk as i32);
                // SAFETY: the arguments follow cage_topk_part_* (logits, v, chunk, k, keys, ids, part); the
                // partial buffers hold rows x parts (x k) entries (candidate_outputs).
                unsafe { part.i32(k as i32).ptr(job.part_keys).ptr(job.part_ids).ptr(job.part).run(dev)? };
                let merge = Launch::new("cage_topk_merge")
                    .grid(job.rows as u32)
                    .block((parts * k).next_multiple_of(32).min(1024) as u32)
                    .ptr(job.part_keys)
                    .ptr(job.part_ids)
                    .ptr(job.part)
                    .i32(parts as i32)
                    .i32(k as i32);
                // SAFETY: cage_topk_merge (keys, ids, part, parts, k, ids_out, logp_out, lse_out); outputs sized
                // rows x k.
                unsafe { merge.ptr(job.ids).ptr(job.logp).ptr(job.lse).run(dev) }
            }
            None => {
                let name = format!("cage_lse_part_{tag}");
                let lse = Launch::new(&name).grid(grid).row_block(chunk).ptr(job.x).i32(v as i32).i32(chunk as i32);
                // SAFETY: cage_lse_part_* (logits, v, chunk, part); `part` holds rows x parts floats.
                unsafe { lse.ptr(job.part).run(dev)? };
                let name = format!("cage_logsoftmax_split_{tag}");
                let write = Launch::new(&name).grid(grid).row_block(chunk).ptr(job.x).i32(v as i32).i32(chunk as i32);
                // SAFETY: cage_logsoftmax_split_* (logits, v, chunk, part, out, lse); outputs rows x V and rows.
                unsafe { write.ptr(job.part).ptr(job.logp).ptr(job.lse).run(dev) }
            }
        }
    }

    /// Copies the result of a finished candidate selection back.
    pub fn fetch_candidates(&mut self, job: &CandJob) -> Result<Candidates> {
        self.check_candidates_generation(job)?;
        let (rows, vocab) = (job.rows, job.vocab);
        let kk = job.k.unwrap_or(vocab);
        let ids = if job.k.is_some() {
            self.download(job.ids, rows * kk)?
        } else {
            (0..rows).flat_map(|_| 0..vocab as u32).collect()
        };
        Ok(Candidates { k: kk, ids, logp: self.download(job.logp, rows * kk)?, lse: self.download(job.lse, rows)? })
    }
}

/// `k` of a top-k selection (`None`: every token) must be 1 to min([`MAX_TOP_K`], vocabulary).
fn check_k(k: Option<usize>, vocab: usize) -> Result<()> {
    match k {
        Some(k) if !(1..=MAX_TOP_K.min(vocab)).contains(&k) => {
            Err(bad(format!("top-k needs 1 <= k <= min({MAX_TOP_K}, vocabulary = {vocab}), got {k}")))
        }
        _ => Ok(()),
    }
}
