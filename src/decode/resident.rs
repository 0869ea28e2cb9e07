//! The decoding step resident on the device ([`crate::gpu::Gpu::resident_step`]) for the engine's loop: when
//! every model of a run decodes on the device (`model_device: emulation | cuda`), each step runs the forwards
//! with [`crate::model::GpuDecoder::forward_device`] (the logits stay where they are), then candidates, values,
//! the policy and the choice on the base model's device; only token ids and each principal's value at them come
//! back. The equilibrium of `cage` then runs on that device whatever the run's `backend` says (the logits are
//! there).
//!
//! The host stages ([`super::stages`]) remain for what has no device form, each a documented host round trip
//! of every stream's logits: a step whose prompts need more than one forward call (a long prefill), a run with
//! `--diagnostics` (they read the whole policy), a principal that only exists on the host (a user
//! [`ValueSource`] without [`ValueSource::device_form`]), `k = 0` or above [`MAX_TOP_K`], `normalize: none`
//! with `linear`, `cage` or `cage-paper`, more than [`MAX_PRINCIPALS`] principals, principal models of another
//! vocabulary size than the base's, and principal models with their own tokenizer (`tokenizer_mismatch:
//! retokenize`: each candidate is read at another id there), and the `parm` method (its guide streams, one per
//! preference, are read by the host stages; CAGE+'s `parm` principals are ARMs and stay on the device).
//! `cage-paper` (the authors' L-BFGS-B solver, which
//! has no device version) keeps a smaller round trip: the device hands back the k candidates, log pi0 and the
//! principals' values (k x (2 + J) numbers a row, not V), the host forms the policy and chooses.

use super::config::DecodeMethod;
use super::engine::{DecodeOptions, RowRequest};
use super::principal::{DeviceForm, ValueSource};
use super::stages::StreamPlan;
use crate::backend::Backend;
use crate::error::{CageError, Result};
use crate::gpu::ResidentLaunch;
use crate::gpu::device::DevPtr;
use crate::gpu::{
    DevicePolicy, MAX_PRINCIPALS, MAX_TOP_K, PrincipalStreams, ResidentMethod, ResidentReport, ResidentStep,
};
use crate::model::gpu::ForwardShape;
use crate::model::{Decoder, LogitsAt};
use crate::problem::Normalize;

/// What a run's resident steps need besides the rows: each principal's device form, the lexicon table and
/// the method; built once per chunk.
pub struct ResidentPlan {
    principals: Vec<PrincipalStreams>,
    lexicon: Vec<f32>,
    method: ResidentMethod,
    shift_min: bool,
    vocab: usize,
    /// B x S row addresses, J weights per row and the row keys of the current step (reused).
    table: Vec<DevPtr>,
    weights: Vec<f32>,
    keys: Vec<u32>,
    /// The last step's tokens and the principals' raw values at them (or, for a policy of the host, the
    /// candidates and their values).
    pub report: ResidentReport,
    /// The graph of the steady-state step and the launches it stands for.
    graph: Option<(usize, ForwardShape, ResidentLaunch)>,
    /// The previous step's launches: a shape seen twice in a row is captured.
    last: Option<(ForwardShape, ResidentLaunch)>,
    /// Which path each step took (see [`StepPaths`]).
    pub paths: StepPaths,
    /// Whether graphs may be captured ([`DecodeOptions::graphs`]).
    graphs: bool,
}

/// How the device steps ran: the steady-state step (forward of the base model's streams, candidates, values,
/// policy, choice and report) is captured as one CUDA graph per shape and replayed; a step whose shape differs
/// from the one before (the prefill, a row finishing) runs its launches one by one.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct StepPaths {
    /// Steps launched as a graph (their capture included).
    pub graph: usize,
    /// Steps launched kernel by kernel.
    pub plain: usize,
    /// Graphs captured.
    pub captures: usize,
    /// Why graphs are off for the run (the capture's error), if they are.
    pub fallback: Option<String>,
}

/// The path a run's decode steps took, for reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StepPath {
    /// The resident step, replayed as a graph in the steady state.
    Graph,
    /// The resident step, launched kernel by kernel.
    Plain,
    /// The host stages (every stream's logits downloaded).
    Host,
}

impl StepPaths {
    /// The path of the steady state: graph when any step replayed one, else plain when any step was resident.
    pub fn path(&self) -> StepPath {
        if self.graph > 0 {
            StepPath::Graph
        } else if self.plain > 0 {
            StepPath::Plain
        } else {
            StepPath::Host
        }
    }
}

impl ResidentPlan {
    /// The plan of a run, or None when some part of it has no device form (see the module documentation).
    pub fn new(
        sources: &[Box<dyn ValueSource>],
        plan: &StreamPlan,
        vocab: &[usize],
        opts: &DecodeOptions,
    ) -> Option<Self> {
        let on_device = matches!(opts.model_device.resolve(), Backend::Emulation | Backend::Cuda);
        let v = vocab[0];
        let method = match opts.method {
            DecodeMethod::Base => ResidentMethod::Policy(DevicePolicy::Base),
            DecodeMethod::Linear => ResidentMethod::Policy(DevicePolicy::Linear),
            DecodeMethod::Genarm => ResidentMethod::Policy(DevicePolicy::Genarm),
            DecodeMethod::Mod => ResidentMethod::Policy(DevicePolicy::Mod),
            DecodeMethod::Cage => ResidentMethod::Equilibrium,
            DecodeMethod::CagePaper => ResidentMethod::Host,
            // PARM's guide streams are read by the host stages (the engine keeps this method there).
            DecodeMethod::Parm => return None,
        };
        let uses_values = matches!(opts.method, DecodeMethod::Linear | DecodeMethod::Cage | DecodeMethod::CagePaper);
        if !on_device
            || opts.diagnostics
            || !(1..=MAX_TOP_K.min(v)).contains(&opts.k)
            || sources.len() > MAX_PRINCIPALS
            || (uses_values && opts.normalize != Normalize::ShiftMin)
            || vocab.iter().any(|&x| x != v)
        {
            return None;
        }
        let mut principals = Vec::with_capacity(sources.len());
        let mut lexicon = vec![];
        for (j, src) in sources.iter().enumerate() {
            principals.push(match src.device_form()? {
                DeviceForm::StreamRatio => match plan.of_source[j][..] {
                    [of, against] => PrincipalStreams::Ratio { of, against },
                    _ => return None,
                },
                DeviceForm::Table(t) if t.len() == v => {
                    lexicon.extend(t.iter().map(|&x| x as f32));
                    PrincipalStreams::Lexicon { row: lexicon.len() / v - 1 }
                }
                DeviceForm::Table(_) => return None,
            });
        }
        Some(ResidentPlan {
            principals,
            lexicon,
            method,
            shift_min: opts.normalize == Normalize::ShiftMin,
            vocab: v,
            table: vec![],
            weights: vec![],
            keys: vec![],
            report: ResidentReport::default(),
            graph: None,
            last: None,
            paths: StepPaths::default(),
            graphs: opts.graphs,
        })
    }

    /// Whether the policy is the host's ([`ResidentMethod::Host`]): the report then holds the candidates and
    /// their values, not tokens.
    pub fn host_policy(&self) -> bool {
        self.method == ResidentMethod::Host
    }

    /// Whether this step's forwards fit one call per model (a long prefill may not: the calls of
    /// [`super::stages::calls_within`] would overwrite each other's logits on the device); else it runs on the host.
    pub fn fits(plan: &StreamPlan, live: &[usize], inputs: &[Vec<Vec<u32>>], prefill_cap: usize) -> bool {
        // One call of `calls_within` holds every sequence when they are one, or all fit under the cap.
        plan.on_model.iter().all(|on| {
            let lens = live.iter().flat_map(|&r| on.iter().map(move |&s| inputs[r][s].len()));
            let (n, tokens) = lens.fold((0, 0), |(n, t), l| (n + 1, t + l));
            n <= 1 || tokens <= prefill_cap
        })
    }

    /// The forwards of one step, logits left on each decoder's device, and the addresses of every live row's
    /// streams in the table. The base model's forward is only staged (its inputs uploaded): [`ResidentPlan::step`]
    /// launches it with the rest of the step, as one graph when it can.
    pub fn forward(
        &mut self,
        decoders: &mut [Option<Box<dyn Decoder + Send>>],
        plan: &StreamPlan,
        live: &[usize],
        inputs: &[Vec<Vec<u32>>],
    ) -> Result<()> {
        let ns = plan.streams.len();
        self.table.clear();
        self.table.resize(live.len() * ns, 0);
        let row_bytes = (self.vocab * 4) as DevPtr;
        for (m, dec) in decoders.iter_mut().enumerate() {
            let Some(dec) = dec.as_mut() else { continue };
            let gpu_dec = dec.as_gpu().ok_or_else(|| not_on_device(m))?;
            let on = &plan.on_model[m];
            let seqs = plan.seqs(m, live, inputs);
            let out = if m == 0 {
                gpu_dec.stage_device(&seqs, LogitsAt::Last)?
            } else {
                let out = gpu_dec.forward_device(&seqs, LogitsAt::Last)?;
                // The step runs on the base model's device and stream: this decoder's forward must be done.
                gpu_dec.gpu().device().synchronize()?;
                out
            };
            for i in 0..live.len() {
                for &s in on {
                    self.table[i * ns + s] = out.ptr + plan.position(i, s) as DevPtr * row_bytes;
                }
            }
        }
        Ok(())
    }

    /// The device step after [`ResidentPlan::forward`] for the chunk's `rows` (the first is row `row0` of the
    /// decode call): fills [`ResidentPlan::report`].
    #[allow(clippy::too_many_arguments)]
    pub fn step(
        &mut self,
        decoders: &mut [Option<Box<dyn Decoder + Send>>],
        plan: &StreamPlan,
        live: &[usize],
        row0: usize,
        rows: &[RowRequest],
        opts: &DecodeOptions,
        step: usize,
    ) -> Result<()> {
        self.weights.clear();
        self.weights.extend(live.iter().flat_map(|&r| rows[r].weights.iter().map(|&w| w as f32)));
        self.keys.clear();
        self.keys.extend(live.iter().map(|&r| (row0 + r) as u32));
        let dec = decoders[0].as_mut().and_then(|d| d.as_gpu()).ok_or_else(|| not_on_device(0))?;
        let s = ResidentStep {
            rows: live.len(),
            streams: plan.streams.len(),
            vocab: self.vocab,
            k: opts.k,
            table: &self.table,
            principals: &self.principals,
            lexicon: &self.lexicon,
            weights: &self.weights,
            tau: opts.tau as f32,
            shift_min: self.shift_min,
            method: self.method,
            choice: opts.choice,
            keys: &self.keys,
            seed: opts.seed,
            step: step as u32,
        };
        // SAFETY: the table holds the addresses `forward` computed from this step's forwards: f32 rows of V
        // logits in the decoders' buffers, untouched until their next forward call.
        unsafe { dec.gpu().resident_prepare(&s) }?;
        let same = |f: &ForwardShape, l: &ResidentLaunch, dec: &mut crate::model::GpuDecoder| {
            f == dec.staged_shape() && l == dec.gpu().resident_launches()
        };
        let graph = match &self.graph {
            Some((g, f, l)) if same(f, l, dec) => Some(*g),
            _ if self.graphs
                && self.paths.fallback.is_none()
                && self.last.as_ref().is_some_and(|(f, l)| same(f, l, dec)) =>
            {
                // The same launches twice in a row: the steady state, captured once for the steps to come.
                if let Some((g, ..)) = self.graph.take() {
                    dec.gpu().device().drop_graph(g);
                }
                match capture(dec) {
                    Ok(g) => {
                        self.paths.captures += 1;
                        let (f, l) = self.last.take().expect("checked above");
                        self.graph = Some((g, f, l));
                        Some(g)
                    }
                    Err(e) => {
                        // Plain launches for the rest of the run, and the reason in the timings.
                        self.paths.fallback = Some(e.to_string());
                        None
                    }
                }
            }
            _ => None,
        };
        match graph {
            Some(g) => {
                dec.gpu().device().launch_graph(g)?;
                self.paths.graph += 1;
            }
            None => {
                dec.launch_staged()?;
                // SAFETY: as for resident_prepare.
                unsafe { dec.gpu().resident_launch() }?;
                self.paths.plain += 1;
                if !self.last.as_ref().is_some_and(|(f, l)| same(f, l, dec)) {
                    self.last = Some((dec.staged_shape().clone(), dec.gpu().resident_launches().clone()));
                }
            }
        }
        dec.gpu().resident_finish(&mut self.report)
    }
}

impl ResidentPlan {
    /// Frees the run's graph on the base model's device (the plan ends with its chunk).
    pub fn release(&mut self, decoders: &mut [Option<Box<dyn Decoder + Send>>]) {
        if let (Some((g, ..)), Some(dec)) = (self.graph.take(), decoders[0].as_mut().and_then(|d| d.as_gpu())) {
            dec.gpu().device().drop_graph(g);
        }
    }
}

/// Captures the staged forward of `dec` and its prepared resident step as one graph (recorded, not run).
fn capture(dec: &mut crate::model::GpuDecoder) -> Result<usize> {
    dec.gpu().device().begin_capture()?;
    let launched = dec.launch_staged().and_then(|()| {
        // SAFETY: the step was prepared on this step's table (see ResidentPlan::step); a graph replays it only
        // for a step prepared with equal launches.
        unsafe { dec.gpu().resident_launch() }
    });
    let graph = dec.gpu().device().end_capture();
    launched?;
    graph
}

fn not_on_device(m: usize) -> CageError {
    CageError::InvalidArgument(format!("model {m}'s decoder is not on a device: the resident step needs it there"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::principal::StreamSpec;
    use crate::decode::stages::calls_within;

    #[test]
    fn a_step_fits_when_the_forward_stage_would_make_one_call_per_model() {
        let told = StreamSpec { model: 0, adapter: None, instruction: Some("x".into()) };
        let base = StreamSpec { model: 0, adapter: None, instruction: None };
        let plan = StreamPlan::new(&[vec![told, base]], 1).unwrap();
        for (lens, cap) in
            [(vec![[3, 4], [5, 6]], 18), (vec![[3, 4], [5, 6]], 17), (vec![[30, 1]], 8), (vec![[1, 1]], 1)]
        {
            let inputs: Vec<Vec<Vec<u32>>> = lens.iter().map(|r| r.iter().map(|&n| vec![7; n]).collect()).collect();
            let live: Vec<usize> = (0..inputs.len()).collect();
            let flat: Vec<usize> = lens.iter().flatten().copied().collect();
            let want = calls_within(&flat, cap).len() <= 1;
            assert_eq!(ResidentPlan::fits(&plan, &live, &inputs, cap), want, "{lens:?} cap {cap}");
        }
        // The first two cases straddle the cap: one fits, one does not.
        let inputs: Vec<Vec<Vec<u32>>> = vec![vec![vec![7; 3], vec![7; 4]], vec![vec![7; 5], vec![7; 6]]];
        assert!(ResidentPlan::fits(&plan, &[0, 1], &inputs, 18) && !ResidentPlan::fits(&plan, &[0, 1], &inputs, 17));
    }
}
