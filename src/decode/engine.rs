//! The decoding loop, over the stages of [`super::stages`]. Per step: one forward per model covering every
//! stream of every live row (base, ARMs with their adapters, references, instructed prompts), candidate
//! selection on the base, the principals' values, the method's policy (the equilibrium on the chosen backend
//! for `cage`), the token choice, and the stop checks. With every model on a device the step between the
//! forwards and the stop checks runs there ([`super::resident`]); the stop checks and row state stay here.
//! Every method runs in this same loop with the same forwards, so their costs and outputs compare fairly.

use super::config::{DecodeMethod, FormatSetting, PrincipalKind, RunConfig, TokenizerMismatch, check_weights};
use super::pool::{DecoderPool, Lease, Room};
use super::principal::{ArmSource, LexiconSource, PromptedSource, StreamSpec, ValueSource};
use super::prompts::PromptTemplate;
use super::resident::ResidentPlan;
use super::stages::{
    PolicyRule, RowCandidates, RowContext, RowState, RowValues, SolveInfo, StepLogits, StepPolicy, StopReason,
    StopRule, StreamPlan, choose, forward, guide, kl_to_base, policy, values,
};
use crate::backend::Backend;
use crate::candidates::Selection;
use crate::error::{CageError, Result};
use crate::gpu::device::Transfers;
use crate::model::weight::WeightStorage;
use crate::model::{Adapter, Decoder, Model, Pblora, PromptFormat, Tokenizer};
use crate::problem::Normalize;
use crate::sampling::Choice;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// Everything a decode call needs besides the prompts.
#[derive(Clone, Debug)]
pub struct DecodeOptions {
    /// How the policy is formed.
    pub method: DecodeMethod,
    /// The agent's temperature.
    pub tau: f64,
    /// Top-k candidates (0 = the whole vocabulary).
    pub k: usize,
    /// Value preprocessing.
    pub normalize: Normalize,
    /// Greedy or sampled.
    pub choice: Choice,
    /// Sampling seed.
    pub seed: u64,
    /// Token limit per row.
    pub max_new_tokens: usize,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Equilibrium backend.
    pub backend: Backend,
    /// Where the forward passes run.
    pub model_device: Backend,
    /// The GPU decoder's KV-cache type.
    pub kv_cache: crate::gpu::KvCacheType,
    /// How a GPU model device holds the linear layers.
    pub gpu_weights: crate::model::devquant::GpuWeights,
    /// Rows decoded together.
    pub batch_size: usize,
    /// Emit a [`StepDiag`] per row and step.
    pub diagnostics: bool,
    /// Keep decoding after EOS (benchmarks: every method then decodes the same number of steps).
    pub ignore_eos: bool,
    /// The `parm` method's beta: pi ~ pi_base * pi_PARM^(1 / beta).
    pub parm_beta: f64,
    /// The index of the first row in the whole run: rows are numbered (events, sampling keys) from here, so that
    /// a run split into shards (cage.ray) numbers and draws each row as the whole run does.
    pub first_row: usize,
    /// Whether the resident step may capture its steady state as a CUDA graph and replay it (on by default;
    /// off, every step launches its kernels one by one: the reference the graph is tested against).
    pub graphs: bool,
}

impl DecodeOptions {
    /// The options a config describes.
    pub fn from_config(cfg: &RunConfig) -> Result<Self> {
        Ok(DecodeOptions {
            method: cfg.method,
            tau: cfg.tau,
            k: cfg.k,
            normalize: cfg.normalize,
            choice: cfg.sampling,
            seed: cfg.seed,
            max_new_tokens: cfg.max_new_tokens,
            stop: cfg.stop.clone(),
            backend: cfg.backend,
            model_device: cfg.model_device,
            kv_cache: cfg.kv_cache,
            gpu_weights: cfg.gpu_weights,
            batch_size: cfg.batch_size,
            diagnostics: false,
            ignore_eos: false,
            parm_beta: cfg.parm_beta,
            first_row: 0,
            graphs: true,
        })
    }
}

/// One prompt to decode, with its own weights (rows of one call may weigh the principals differently).
#[derive(Clone, Debug)]
pub struct RowRequest {
    /// The user's prompt.
    pub prompt: String,
    /// One weight per principal.
    pub weights: Vec<f64>,
}

/// The result of one row.
#[derive(Clone, Debug, Serialize)]
pub struct RowResult {
    /// The prompt.
    pub prompt: String,
    /// The weights it was decoded with.
    pub weights: Vec<f64>,
    /// Generated text (special tokens dropped, cut before a stop string).
    pub text: String,
    /// Generated token ids (including a final EOS).
    pub tokens: Vec<u32>,
    /// Why the row stopped (`eos`, `stop` or `length` in JSON).
    pub stop_reason: StopReason,
    /// Per principal: the sequence-level implicit reward sum_t q_j(a_t) (GenARM's definition).
    pub scores: Vec<f64>,
}

/// Per row and step diagnostics (JSON lines with `--diagnostics`).
#[derive(Clone, Debug, Serialize)]
pub struct StepDiag {
    /// Row index in the call.
    pub row: usize,
    /// Step (0 = first generated token).
    pub step: usize,
    /// Chosen token id.
    pub token: u32,
    /// Solver iterations (0 for methods without a solver).
    pub iterations: u32,
    /// Solver residual (relative).
    pub residual: f64,
    /// Whether the solver converged.
    pub converged: bool,
    /// Names of the principals that paid a positive incentive.
    pub paid: Vec<String>,
    /// KL(pi || pi0) over the candidates.
    pub kl: f64,
    /// Milliseconds of this step's forwards (all rows together).
    pub forward_ms: f64,
    /// Milliseconds of this step's policy computation (all rows together).
    pub policy_ms: f64,
}

impl StepDiag {
    /// The diagnostics of chunk row `row` at `step`: its token, the solver's report, KL(pi || pi0), and the
    /// step's seconds of forwards and policy.
    fn new(
        row: usize,
        step: usize,
        token: u32,
        info: &SolveInfo,
        names: &[String],
        kl: f64,
        (forward_s, policy_s): (f64, f64),
    ) -> Self {
        StepDiag {
            row,
            step,
            token,
            iterations: info.iterations,
            residual: info.residual,
            converged: info.converged,
            paid: info.paid.iter().map(|&j| names[j].clone()).collect(),
            kl,
            forward_ms: forward_s * 1e3,
            policy_ms: policy_s * 1e3,
        }
    }
}

/// What the loop reports while it runs.
#[derive(Debug)]
pub enum Event<'a> {
    /// New text of a row.
    Text {
        /// Row index.
        row: usize,
        /// The new piece.
        text: &'a str,
    },
    /// A step's diagnostics of one row.
    Step(&'a StepDiag),
    /// A row finished.
    RowDone {
        /// Row index.
        row: usize,
        /// Its result (the same as in the returned list), for writing it out as soon as it is known.
        result: &'a RowResult,
    },
}

/// Seconds spent in each phase, summed over the call.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Timings {
    /// Model forwards (prefill and decode).
    pub forward_s: f64,
    /// Candidate selection and the principals' values (host stages only: on the device they are part of
    /// `policy_s`).
    pub values_s: f64,
    /// The method's policy (the equilibrium for `cage`); on the device, the whole step after the forwards
    /// (candidates, values, policy, choice and the report's download).
    pub policy_s: f64,
    /// Token choice, detokenisation and stop checks.
    pub sampling_s: f64,
    /// Prefill forwards (included in `forward_s`).
    pub prefill_s: f64,
    /// Decode steps (batched over rows).
    pub steps: usize,
    /// Generated tokens over all rows.
    pub tokens: usize,
    /// Host-device traffic of the decode steps after the first (the steady state; the first step's prefill is
    /// left out), over the decoders' devices and the shared equilibrium device. Zero on the CPU.
    pub step_transfers: Transfers,
    /// The steps `step_transfers` covers.
    pub transfer_steps: usize,
    /// How the device steps ran: replayed graphs, plain launches (see [`super::resident::StepPaths`]).
    pub paths: super::resident::StepPaths,
}

impl Timings {
    fn add(&mut self, o: &Timings) {
        self.forward_s += o.forward_s;
        self.values_s += o.values_s;
        self.policy_s += o.policy_s;
        self.sampling_s += o.sampling_s;
        self.prefill_s += o.prefill_s;
        self.steps += o.steps;
        self.tokens += o.tokens;
        self.step_transfers = self.step_transfers.plus(o.step_transfers);
        self.transfer_steps += o.transfer_steps;
        self.paths.graph += o.paths.graph;
        self.paths.plain += o.paths.plain;
        self.paths.captures += o.paths.captures;
        if self.paths.fallback.is_none() {
            self.paths.fallback.clone_from(&o.paths.fallback);
        }
    }
}

/// The base model, the principals' models and value sources, and the shared tokenizer.
pub struct Engine {
    models: Vec<(PathBuf, Arc<Model>)>,
    tokenizer: Tokenizer,
    tokenizer_model: Option<serde_json::Value>,
    tokenizer_mismatch: TokenizerMismatch,
    sources: Vec<Box<dyn ValueSource>>,
    format: PromptFormat,
    /// A prompt template, rendered and then encoded as plain text (instead of `format`).
    template: Option<PromptTemplate>,
    /// Per model, its own tokenizer when it reads text (`tokenizer_mismatch: retokenize`); `None`: the run's.
    retokenized: Vec<Option<Retokenized>>,
    eos: Vec<u32>,
    /// The decoders, kept from call to call.
    pool: DecoderPool,
    /// The PBLoRA adapters loaded, with the preferences materialised so far.
    pblora: Vec<PbloraOn>,
    /// How the models loaded after the base hold their matrices (the config's `cpu_weights`).
    storage: WeightStorage,
    /// The `parm` method's guide, when every principal is a `parm` principal on one adapter.
    parm: Option<ParmGuide>,
}

/// A PBLoRA adapter on one of the engine's models, and the adapter id of each preference materialised on it:
/// one unmerged LoRA per distinct preference, so rows of several preferences share the backbone's batch.
struct PbloraOn {
    model: usize,
    dir: PathBuf,
    adapter: Pblora,
    at: Vec<(Vec<f64>, usize)>,
}

/// The `parm` method's guide: the PBLoRA adapter of the `parm` principals and their preferences; a row of
/// weights w is guided by the adapter at alpha = sum_j w_j preference_j (w itself when principal j is PARM at
/// the unit vector e_j, as in CAGE+).
struct ParmGuide {
    entry: usize,
    preferences: Vec<Vec<f64>>,
}

/// The `parm` method's guide of a run whose principals are `parm_of` (each one's PBLoRA entry and preference
/// when it is a `parm` principal): `None` unless all are `parm` principals on one adapter.
fn parm_guide(parm_of: Vec<Option<(usize, Vec<f64>)>>) -> Option<ParmGuide> {
    let all: Vec<(usize, Vec<f64>)> = parm_of.into_iter().collect::<Option<_>>()?;
    let entry = all.first()?.0;
    if all.iter().any(|(e, _)| *e != entry) {
        return None;
    }
    Some(ParmGuide { entry, preferences: all.into_iter().map(|(_, p)| p).collect() })
}

impl ParmGuide {
    fn alpha(&self, w: &[f64]) -> Vec<f64> {
        let mut a = vec![0.0; self.preferences[0].len()];
        for (wj, p) in w.iter().zip(&self.preferences) {
            for (x, pi) in a.iter_mut().zip(p) {
                *x += wj * pi;
            }
        }
        a
    }
}

fn tokenizer_model(dir: &Path) -> Result<Option<serde_json::Value>> {
    let p = dir.join("tokenizer.json");
    if !p.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&p)
        .map_err(|source| CageError::Io { context: format!("reading {}", p.display()), source })?;
    let mut v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| CageError::Format { what: p.display().to_string(), msg: e.to_string() })?;
    Ok(v.get_mut("model").map(serde_json::Value::take))
}

fn load_model(dir: &Path, storage: WeightStorage) -> Result<Model> {
    if !dir.join("config.json").is_file() {
        return Err(CageError::Model {
            model: dir.display().to_string(),
            msg: "no model here (config.json is missing); check the path, or run `cage fetch-model` for the default model"
                .into(),
        });
    }
    Model::load_as(dir, storage)
}

/// The error of a model folder whose tokenizer differs from the run's.
fn tokenizer_error(dir: &Path) -> CageError {
    CageError::Model {
        model: dir.display().to_string(),
        msg: "its tokenizer.json differs from the run's tokenizer (the base model's, or the config's `tokenizer`); base and principals must share a tokenizer, or the config must opt in with \"tokenizer_mismatch\": \"retokenize\" (a principal model reads text) or \"allow\" (ids are read as the same tokens)".into(),
    }
}

/// A principal model with its own tokenizer (`tokenizer_mismatch: retokenize`), as the authors' HH setting
/// runs TinyLlama ARMs under a Llama-2 base: the text of every base token in the model's ids, computed once.
struct Retokenized {
    tokenizer: Tokenizer,
    /// Per base id, what the model is fed when that token is chosen: its text encoded by the model's tokenizer
    /// (never empty: a token without text there is fed the model's id 0).
    pieces: Vec<Vec<u32>>,
    /// Per base id, the first of its pieces: where the model's distribution is read for that candidate.
    first: Arc<[u32]>,
    /// The longest piece.
    longest: usize,
}

impl Retokenized {
    fn new(base: &Tokenizer, dir: &Path, base_vocab: usize) -> Result<Self> {
        let tokenizer = Tokenizer::load(dir)?;
        let mut pieces = Vec::with_capacity(base_vocab);
        for id in 0..base_vocab as u32 {
            let text = base.decode(&[id], false)?;
            let mut ids = if text.is_empty() { vec![] } else { tokenizer.encode(&text, false)? };
            if ids.is_empty() {
                ids.push(0);
            }
            pieces.push(ids);
        }
        let first: Arc<[u32]> = pieces.iter().map(|p| p[0]).collect();
        let longest = pieces.iter().map(Vec::len).max().unwrap_or(1);
        Ok(Retokenized { tokenizer, pieces, first, longest })
    }
}

impl Engine {
    /// The most ids model `m` is fed per generated token (1 unless it reads text with its own tokenizer).
    fn piece_max(&self, m: usize) -> usize {
        self.retokenized[m].as_ref().map_or(1, |r| r.longest)
    }

    /// An engine with the base model in `base` (model 0) and no principals. `tokenizer` overrides the folder
    /// holding `tokenizer.json`.
    pub fn new(base: &Path, tokenizer: Option<&Path>, prompt_format: FormatSetting) -> Result<Self> {
        Self::new_as(base, tokenizer, prompt_format, WeightStorage::Stored)
    }

    /// [`Engine::new`] with every model's matrices held as `storage` says.
    pub fn new_as(
        base: &Path,
        tokenizer: Option<&Path>,
        prompt_format: FormatSetting,
        storage: WeightStorage,
    ) -> Result<Self> {
        let tdir = tokenizer.unwrap_or(base);
        let tok = Tokenizer::load(tdir)?;
        let format = prompt_format.resolve(&tok);
        let model = load_model(base, storage)?;
        let mut eos: Vec<u32> = model.config.eos_token_ids.clone();
        eos.extend(tok.eos_id());
        Ok(Engine {
            models: vec![(base.to_path_buf(), Arc::new(model))],
            tokenizer_model: tokenizer_model(tdir)?,
            tokenizer: tok,
            tokenizer_mismatch: TokenizerMismatch::Error,
            sources: vec![],
            format,
            template: None,
            retokenized: vec![None],
            eos,
            pool: DecoderPool::default(),
            pblora: vec![],
            storage,
            parm: None,
        })
    }

    /// Builds the engine a config describes: models (shared when paths agree), adapters, principals.
    pub fn from_config(cfg: &RunConfig) -> Result<Self> {
        cfg.check()?;
        let mut e = Engine::new_as(&cfg.base, cfg.tokenizer.as_deref(), cfg.prompt_format, cfg.cpu_weights)?;
        e.template = cfg.prompt_template.clone();
        e.tokenizer_mismatch = cfg.tokenizer_mismatch;
        // A `tokenizer` override is checked against the base's own tokenizer.json too; the base always reads the
        // run's tokenizer's ids.
        if e.tokenizer_mismatch != TokenizerMismatch::Allow && e.tokenizer_differs(&cfg.base)? {
            return Err(tokenizer_error(&cfg.base));
        }
        // Per principal, its PBLoRA entry and preference when it is a `parm` principal.
        let mut parm_of: Vec<Option<(usize, Vec<f64>)>> = vec![];
        for p in &cfg.principals {
            parm_of.push(None);
            let src: Box<dyn ValueSource> = match &p.kind {
                PrincipalKind::Arm { model, adapter, reference } => {
                    let m = match model {
                        Some(d) => e.add_model(d)?,
                        None => 0,
                    };
                    let ad = match adapter {
                        Some(a) => Some(e.attach_adapter(m, a)?),
                        None => None,
                    };
                    let r = match reference {
                        Some(d) => e.add_model(d)?,
                        None => m,
                    };
                    let arm = StreamSpec { model: m, adapter: ad, instruction: None };
                    let reference = StreamSpec { model: r, adapter: None, instruction: None };
                    if arm == reference {
                        return Err(CageError::InvalidArgument(format!(
                            "ARM principal {:?} is its own reference (give an adapter, or a model and a different reference)",
                            p.name
                        )));
                    }
                    Box::new(ArmSource { name: p.name.clone(), arm, reference })
                }
                PrincipalKind::Prompted { model, instruction } => {
                    let m = match model {
                        Some(d) => e.add_model(d)?,
                        None => 0,
                    };
                    Box::new(PromptedSource { name: p.name.clone(), model: m, instruction: instruction.clone() })
                }
                PrincipalKind::Lexicon { words, default } => {
                    let v = e.models[0].1.config.vocab_size;
                    Box::new(LexiconSource::new(&p.name, words, *default, &e.tokenizer, v)?)
                }
                PrincipalKind::Parm { model, adapter, preference } => {
                    let m = match model {
                        Some(d) => e.add_model(d)?,
                        None => 0,
                    };
                    let entry = e.add_pblora(m, adapter)?;
                    *parm_of.last_mut().expect("pushed above") = Some((entry, preference.clone()));
                    let ad = e.pblora_at(entry, preference).map_err(|err| match err {
                        CageError::Model { model, msg } => {
                            CageError::Model { model, msg: format!("principal {:?}: {msg}", p.name) }
                        }
                        err => err,
                    })?;
                    let arm = StreamSpec { model: m, adapter: Some(ad), instruction: None };
                    let reference = StreamSpec { model: m, adapter: None, instruction: None };
                    Box::new(ArmSource { name: p.name.clone(), arm, reference })
                }
            };
            e.add_source(src);
        }
        e.parm = parm_guide(parm_of);
        Ok(e)
    }

    /// Loads a PBLoRA adapter for model `model` (or finds it loaded) and returns its entry.
    fn add_pblora(&mut self, model: usize, dir: &Path) -> Result<usize> {
        let key = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        if let Some(i) = self.pblora.iter().position(|b| b.model == model && key(&b.dir) == key(dir)) {
            return Ok(i);
        }
        let adapter = Pblora::load(dir, &self.models[model].1)?;
        self.pblora.push(PbloraOn { model, dir: dir.to_path_buf(), adapter, at: vec![] });
        Ok(self.pblora.len() - 1)
    }

    /// The adapter id of PBLoRA entry `entry` at preference `alpha`, materialised and attached on first use.
    fn pblora_at(&mut self, entry: usize, alpha: &[f64]) -> Result<usize> {
        if let Some((_, id)) = self.pblora[entry].at.iter().find(|(x, _)| x == alpha) {
            return Ok(*id);
        }
        let ad = self.pblora[entry].adapter.at(alpha)?;
        let model = self.pblora[entry].model;
        let id = self.attach(model, &ad)?;
        self.pblora[entry].at.push((alpha.to_vec(), id));
        Ok(id)
    }

    /// Readies the engine for `rows` decoded by `method`: for `parm`, materialises the PARM adapter at every
    /// row's preference (decoding cannot: the models are shared with the decoders then). Nothing otherwise.
    pub fn prepare(&mut self, rows: &[RowRequest], method: DecodeMethod) -> Result<()> {
        if method != DecodeMethod::Parm {
            return Ok(());
        }
        let names = self.principal_names();
        let entry = self.parm_entry()?;
        for r in rows {
            check_weights(&r.weights, &names)?;
            let alpha = self.parm.as_ref().expect("checked by parm_entry").alpha(&r.weights);
            self.pblora_at(entry, &alpha)?;
        }
        Ok(())
    }

    /// The PBLoRA entry of the `parm` method, or the error saying why there is none.
    fn parm_entry(&self) -> Result<usize> {
        self.parm.as_ref().map(|g| g.entry).ok_or_else(|| {
            CageError::InvalidArgument(
                "method parm guides the base by a PARM adapter at the row's preference: every principal must be of kind \"parm\" on one PBLoRA adapter (the weights mix their preferences)".into(),
            )
        })
    }

    /// Per row, the adapter id of the `parm` guide at its preference (prepared by [`Engine::prepare`]).
    fn parm_adapters(&self, rows: &[RowRequest]) -> Result<Vec<usize>> {
        let entry = self.parm_entry()?;
        let g = self.parm.as_ref().expect("checked by parm_entry");
        rows.iter()
            .map(|r| {
                let alpha = g.alpha(&r.weights);
                self.pblora[entry].at.iter().find(|(x, _)| *x == alpha).map(|(_, id)| *id).ok_or_else(|| {
                    CageError::InvalidArgument(format!(
                        "the PARM adapter at preference {alpha:?} is not materialised: call Engine::prepare with the rows before decoding them"
                    ))
                })
            })
            .collect()
    }

    /// Loaded model `i` (0: the base), if there is one.
    pub fn model(&self, i: usize) -> Option<&Model> {
        self.models.get(i).map(|(_, m)| &**m)
    }

    /// Loads a model (or finds it already loaded) and returns its index. A model folder with its own
    /// `tokenizer.json` must use the base's tokenizer: the principals score the base's candidate ids.
    pub fn add_model(&mut self, dir: &Path) -> Result<usize> {
        let key = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        if let Some(i) = self.models.iter().position(|(p, _)| key(p) == key(dir)) {
            return Ok(i);
        }
        let model = load_model(dir, self.storage)?;
        let retokenized = match self.tokenizer_mismatch {
            _ if !self.tokenizer_differs(dir)? => None,
            TokenizerMismatch::Error => return Err(tokenizer_error(dir)),
            TokenizerMismatch::Allow => None,
            TokenizerMismatch::Retokenize => {
                Some(Retokenized::new(&self.tokenizer, dir, self.models[0].1.config.vocab_size)?)
            }
        };
        // The principals score the base's candidate ids: a smaller vocabulary would fail at the first step.
        let base_vocab = self.models[0].1.config.vocab_size;
        if retokenized.is_none() && model.config.vocab_size < base_vocab {
            return Err(CageError::Model {
                model: dir.display().to_string(),
                msg: format!(
                    "its vocabulary has {} tokens, fewer than the base model's {base_vocab} ({}); base and principals must share a vocabulary",
                    model.config.vocab_size,
                    self.models[0].0.display()
                ),
            });
        }
        self.models.push((dir.to_path_buf(), Arc::new(model)));
        self.retokenized.push(retokenized);
        Ok(self.models.len() - 1)
    }

    /// Whether a model folder has its own `tokenizer.json` and it differs from the run's tokenizer (the base's,
    /// or the `tokenizer` override's).
    fn tokenizer_differs(&self, dir: &Path) -> Result<bool> {
        Ok(matches!((&self.tokenizer_model, tokenizer_model(dir)?), (Some(mine), Some(theirs)) if *mine != theirs))
    }

    /// Loads a LoRA adapter onto model `model` (unmerged) and returns its adapter id.
    pub fn attach_adapter(&mut self, model: usize, dir: &Path) -> Result<usize> {
        let (_, m) =
            self.models.get(model).ok_or_else(|| CageError::InvalidArgument(format!("no model with index {model}")))?;
        let ad = Adapter::load(dir, m)?;
        self.attach(model, &ad)
    }

    /// Attaches a loaded adapter to model `model` (unmerged) and returns its adapter id.
    fn attach(&mut self, model: usize, ad: &Adapter) -> Result<usize> {
        // Pooled decoders hold the model without the adapter (and share it): built anew at the next call.
        self.pool.clear();
        let (path, m) = &mut self.models[model];
        let m = Arc::get_mut(m).ok_or_else(|| CageError::Model {
            model: path.display().to_string(),
            msg: "adapters must be attached before decoding starts".into(),
        })?;
        m.attach_adapter(ad)
    }

    /// Adds a principal.
    pub fn add_source(&mut self, s: Box<dyn ValueSource>) {
        self.sources.push(s);
    }

    /// The shared tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The principals' names, in order.
    pub fn principal_names(&self) -> Vec<String> {
        self.sources.iter().map(|s| s.name().to_string()).collect()
    }

    /// Prompt ids of a stream on model `model`: the instruction, if any, goes before the user's prompt inside
    /// the same format; a model with its own tokenizer encodes the text with it.
    fn stream_prompt(&self, prompt: &str, instruction: Option<&str>, model: usize) -> Result<Vec<u32>> {
        let text = match instruction {
            Some(i) => format!("{i}\n\n{prompt}"),
            None => prompt.to_string(),
        };
        let tok = self.retokenized[model].as_ref().map_or(&self.tokenizer, |r| &r.tokenizer);
        let ids = match &self.template {
            Some(t) => tok.prompt_ids(&t.render(&text), PromptFormat::Plain)?,
            None => tok.prompt_ids(&text, self.format)?,
        };
        if ids.is_empty() {
            return Err(CageError::InvalidArgument(format!("prompt {prompt:?} encodes to no tokens")));
        }
        Ok(ids)
    }

    /// Decodes `rows` in batches of `opts.batch_size`, reporting progress through `sink`.
    pub fn decode(
        &self,
        rows: &[RowRequest],
        opts: &DecodeOptions,
        sink: &mut dyn FnMut(Event),
    ) -> Result<(Vec<RowResult>, Timings)> {
        self.decode_with(rows, opts, &mut |ev| {
            sink(ev);
            Ok(())
        })
    }

    /// [`Engine::decode`] with a sink that can fail (a closed output, a full disk): its first error stops the
    /// decoding and is returned. Every prompt is checked against the models' contexts before any work: a prompt
    /// that leaves no room to generate is an error, and a row whose sequence fills a context stops there with
    /// [`StopReason::Context`].
    pub fn decode_with(
        &self,
        rows: &[RowRequest],
        opts: &DecodeOptions,
        sink: &mut dyn FnMut(Event) -> Result<()>,
    ) -> Result<(Vec<RowResult>, Timings)> {
        let names = self.principal_names();
        for r in rows {
            check_weights(&r.weights, &names)?;
        }
        if !crate::problem::valid_tau(opts.tau) {
            return Err(CageError::BadTau(opts.tau));
        }
        if opts.batch_size == 0 {
            return Err(CageError::InvalidArgument("batch_size must be >= 1".into()));
        }
        if !(opts.parm_beta.is_finite() && opts.parm_beta > 0.0) {
            return Err(CageError::InvalidArgument(format!("parm_beta must be > 0, got {}", opts.parm_beta)));
        }
        let guides = match opts.method {
            DecodeMethod::Parm => Some(self.parm_adapters(rows)?),
            _ => None,
        };
        let declared: Vec<Vec<StreamSpec>> = self.sources.iter().map(|s| s.streams()).collect();
        let plan = StreamPlan::new(&declared, self.models.len())?;
        let room: Vec<usize> =
            rows.iter().enumerate().map(|(i, r)| self.room(&plan, i, &r.prompt)).collect::<Result<_>>()?;
        let mut out = Vec::with_capacity(rows.len());
        let mut total = Timings::default();
        for (c, chunk) in rows.chunks(opts.batch_size).enumerate() {
            let at = c * opts.batch_size;
            let g = guides.as_ref().map(|g| &g[at..at + chunk.len()]);
            let (res, t) = self.decode_chunk(chunk, opts.first_row + at, &room[at..at + chunk.len()], g, opts, sink)?;
            out.extend(res);
            total.add(&t);
        }
        Ok((out, total))
    }

    /// How many tokens row `row` (prompt `prompt`) can generate before one of its streams fills its model's
    /// context (`max_position_embeddings`); an error when a prompt alone fills it.
    fn room(&self, plan: &StreamPlan, row: usize, prompt: &str) -> Result<usize> {
        let mut room = usize::MAX;
        for sp in &plan.streams {
            let n = self.stream_prompt(prompt, sp.instruction.as_deref(), sp.model)?.len();
            let (dir, model) = &self.models[sp.model];
            let ctx = model.config.max_position_embeddings;
            if n >= ctx {
                let with = if sp.instruction.is_some() { " with a principal's instruction" } else { "" };
                return Err(CageError::InvalidArgument(format!(
                    "prompt {:?} (row {row}) is {n} tokens{with}, but model {} has a context of {ctx} tokens \
                     (max_position_embeddings): no room to generate; shorten the prompt",
                    prompt.chars().take(40).collect::<String>(),
                    dir.display()
                )));
            }
            // A model with its own tokenizer may take several ids per generated token.
            room = room.min((ctx - n) / self.piece_max(sp.model));
        }
        Ok(room)
    }

    /// Decodes one chunk of rows together: the stages of [`super::stages`] in a loop over steps, on buffers
    /// allocated here once. `room` holds each row's [`Engine::room`]; `guides`, for `parm`, each row's adapter
    /// id of the PARM guide (one extra stream per distinct preference in the chunk).
    fn decode_chunk(
        &self,
        rows: &[RowRequest],
        row0: usize,
        room: &[usize],
        guides: Option<&[usize]>,
        opts: &DecodeOptions,
        sink: &mut dyn FnMut(Event) -> Result<()>,
    ) -> Result<(Vec<RowResult>, Timings)> {
        let mut tm = Timings::default();
        let (b, nj) = (rows.len(), self.sources.len());
        let mut declared: Vec<Vec<StreamSpec>> = self.sources.iter().map(|s| s.streams()).collect();
        let guide_spec = |id: usize| StreamSpec {
            model: self.pblora[self.parm.as_ref().map_or(0, |g| g.entry)].model,
            adapter: Some(id),
            instruction: None,
        };
        if let Some(g) = guides {
            let mut ids = g.to_vec();
            ids.sort_unstable();
            ids.dedup();
            declared.push(ids.into_iter().map(guide_spec).collect());
        }
        let plan = StreamPlan::new(&declared, self.models.len())?;
        // Per row, the stream of its PARM guide.
        let guide_streams: Vec<usize> = guides
            .unwrap_or_default()
            .iter()
            .map(|&id| plan.streams.iter().position(|s| *s == guide_spec(id)).expect("declared above"))
            .collect();
        // What each row feeds each stream at the next forward: its prompt, then its last token.
        let mut inputs: Vec<Vec<Vec<u32>>> = Vec::with_capacity(b);
        for r in rows {
            inputs.push(
                plan.streams
                    .iter()
                    .map(|sp| self.stream_prompt(&r.prompt, sp.instruction.as_deref(), sp.model))
                    .collect::<Result<_>>()?,
            );
        }
        let longest = inputs.iter().flatten().map(Vec::len).max().unwrap_or(1);
        let prefill_cap = longest.max(1024);
        // Positions per KV slot: never more than the longest context (a huge max_new_tokens must not allocate).
        let max_ctx = self.models.iter().map(|(_, m)| m.config.max_position_embeddings).max().unwrap_or(0);
        let per_token = (0..self.models.len()).map(|m| self.piece_max(m)).max().unwrap_or(1);
        let positions = (longest + opts.max_new_tokens.min(max_ctx) * per_token + 1).min(max_ctx + 1);
        let mut lease = self.decoders(&plan, &inputs, positions, prefill_cap, opts)?;
        let decoders = &mut lease.decoders;
        let names = self.principal_names();
        let selection = if opts.k == 0 { Selection::All } else { Selection::TopK(opts.k) };
        let own_policies = matches!(opts.method, DecodeMethod::Genarm | DecodeMethod::Mod);
        let rule = PolicyRule {
            method: opts.method,
            tau: opts.tau,
            normalize: opts.normalize,
            backend: opts.backend,
            names: &names,
            parm_beta: opts.parm_beta,
        };
        let stop = StopRule {
            eos: &self.eos,
            stop: &opts.stop,
            max_new_tokens: opts.max_new_tokens,
            ignore_eos: opts.ignore_eos,
            context: usize::MAX,
        };
        // The step's buffers, refilled at every step for the live rows (the first `live.len()` entries).
        let mut logits =
            StepLogits::new(self.models.iter().map(|(_, m)| m.config.vocab_size).collect(), plan.streams.len())
                .with_ids(self.retokenized.iter().map(|r| r.as_ref().map(|r| r.first.clone())).collect());
        let mut cands = vec![RowCandidates::default(); b];
        let mut vals = vec![RowValues::default(); b];
        let mut weights: Vec<f64> = Vec::with_capacity(b * nj);
        let mut pol = StepPolicy::default();
        let mut scratch: Vec<f32> = vec![];
        let mut states: Vec<RowState> =
            room.iter().map(|&n| RowState::new(nj, opts.max_new_tokens.min(n).min(1 << 16))).collect();
        let mut live: Vec<usize> = (0..b).collect();
        let vocabs: Vec<usize> = self.models.iter().map(|(_, m)| m.config.vocab_size).collect();
        // A model with its own tokenizer reads each candidate at another id, and the `parm` method's guide
        // streams are read on the host: the host stages run those.
        let retokenized = self.retokenized.iter().any(Option::is_some);
        let mut resident =
            ResidentPlan::new(&self.sources, &plan, &vocabs, opts).filter(|_| !retokenized && guide_streams.is_empty());
        let mut guide_live: Vec<usize> = Vec::with_capacity(b);
        // Transfers at the start of step 1, once the prefill is done.
        let mut counted = None;
        for step in 0..opts.max_new_tokens {
            if live.is_empty() {
                break;
            }
            let nl = live.len();
            if step == 1 {
                counted = Some(transfers(decoders));
            }
            if let Some(rp) = resident.as_mut().filter(|_| ResidentPlan::fits(&plan, &live, &inputs, prefill_cap)) {
                // The step on the device: only the tokens and the principals' values there come back.
                let t0 = Instant::now();
                rp.forward(decoders, &plan, &live, &inputs)?;
                let fwd = t0.elapsed().as_secs_f64();
                tm.forward_s += fwd;
                if step == 0 {
                    tm.prefill_s += fwd;
                }
                let t2 = Instant::now();
                rp.step(decoders, &plan, &live, row0, rows, opts, step)?;
                if rp.host_policy() {
                    // The candidates and their values came back: the host's policy and choice.
                    let (rep, k) = (&rp.report, opts.k);
                    for i in 0..nl {
                        cands[i].ids.clear();
                        cands[i].ids.extend_from_slice(&rep.ids[i * k..(i + 1) * k]);
                        cands[i].base_logprobs.clear();
                        cands[i].base_logprobs.extend(rep.logp[i * k..(i + 1) * k].iter().map(|&x| x as f64));
                        vals[i].q.clear();
                        vals[i].q.extend(rep.raw[i * nj * k..(i + 1) * nj * k].iter().map(|&x| x as f64));
                        vals[i].own.clear();
                    }
                    weights.clear();
                    weights.extend(live.iter().flat_map(|&r| rows[r].weights.iter().copied()));
                    policy(&rule, &cands[..nl], &vals[..nl], &weights, &mut pol)?;
                }
                tm.policy_s += t2.elapsed().as_secs_f64();
                let t3 = Instant::now();
                for (i, &r) in live.iter().enumerate() {
                    if rp.host_policy() {
                        let a = choose(pol.row(i), opts.choice, opts.seed, row0 + r, step, &mut scratch)?;
                        states[r].push(cands[i].ids[a], &vals[i], a, pol.candidates);
                    } else {
                        states[r].push_values(rp.report.tokens[i], &rp.report.values[i * nj..(i + 1) * nj]);
                    }
                    let rule = StopRule { context: room[r], ..stop };
                    self.after_token(&plan, row0 + r, &mut states[r], &mut inputs[r], &rule, sink)?;
                }
                tm.tokens += nl;
                tm.sampling_s += t3.elapsed().as_secs_f64();
            } else {
                // The step on the host: every stream's logits come back (from a device decoder, a download).
                let t0 = Instant::now();
                forward(decoders, &plan, &live, &inputs, prefill_cap, &mut logits)?;
                let fwd = t0.elapsed().as_secs_f64();
                tm.forward_s += fwd;
                if step == 0 {
                    tm.prefill_s += fwd;
                }
                // Candidates and values.
                let t1 = Instant::now();
                logits.normalise(&plan, nl);
                for (i, c) in cands[..nl].iter_mut().enumerate() {
                    c.select(logits.logits(&plan, i, 0), selection)?;
                }
                let ctx: Vec<RowContext> =
                    live.iter().map(|&r| RowContext { row: row0 + r, generated: &states[r].generated }).collect();
                values(&self.sources, &plan, &logits, &ctx, &cands[..nl], own_policies, &mut vals[..nl])?;
                if !guide_streams.is_empty() {
                    guide_live.clear();
                    guide_live.extend(live.iter().map(|&r| guide_streams[r]));
                    guide(&plan, &logits, &guide_live, &cands[..nl], &mut vals[..nl])?;
                }
                tm.values_s += t1.elapsed().as_secs_f64();
                // The method's policy.
                let t2 = Instant::now();
                weights.clear();
                weights.extend(live.iter().flat_map(|&r| rows[r].weights.iter().copied()));
                policy(&rule, &cands[..nl], &vals[..nl], &weights, &mut pol)?;
                let pol_s = t2.elapsed().as_secs_f64();
                tm.policy_s += pol_s;
                // Token choice and stop checks.
                let t3 = Instant::now();
                for (i, &r) in live.iter().enumerate() {
                    let a = choose(pol.row(i), opts.choice, opts.seed, row0 + r, step, &mut scratch)?;
                    let tok = cands[i].ids[a];
                    states[r].push(tok, &vals[i], a, pol.candidates);
                    if opts.diagnostics {
                        let kl = kl_to_base(pol.row(i), &cands[i].base_logprobs);
                        let d = StepDiag::new(row0 + r, step, tok, &pol.info[i], &names, kl, (fwd, pol_s));
                        sink(Event::Step(&d))?;
                    }
                    let rule = StopRule { context: room[r], ..stop };
                    self.after_token(&plan, row0 + r, &mut states[r], &mut inputs[r], &rule, sink)?;
                }
                tm.tokens += nl;
                tm.sampling_s += t3.elapsed().as_secs_f64();
            }
            let t3 = Instant::now();
            for &r in live.iter().filter(|&&r| states[r].stop.is_some()) {
                sink(Event::RowDone { row: row0 + r, result: &row_result(&rows[r], &states[r]) })?;
            }
            live.retain(|&r| states[r].stop.is_none());
            tm.sampling_s += t3.elapsed().as_secs_f64();
            tm.steps += 1;
        }
        if let Some(start) = counted {
            tm.step_transfers = transfers(decoders).since(start);
            tm.transfer_steps = tm.steps - 1;
        }
        if let Some(rp) = resident.as_mut() {
            rp.release(decoders);
            tm.paths = std::mem::take(&mut rp.paths);
        }
        for &r in &live {
            states[r].stop = Some(StopReason::Length);
            sink(Event::RowDone { row: row0 + r, result: &row_result(&rows[r], &states[r]) })?;
        }
        Ok((rows.iter().zip(&states).map(|(req, st)| row_result(req, st)).collect(), tm))
    }

    /// The stop stage of row `row` (of the decode call) after its new token was pushed: the token becomes the
    /// row's next input on every stream of `plan` (re-encoded for a model with its own tokenizer), its text is
    /// shown as far as it can be.
    fn after_token(
        &self,
        plan: &StreamPlan,
        row: usize,
        st: &mut RowState,
        inputs: &mut [Vec<u32>],
        rule: &StopRule,
        sink: &mut dyn FnMut(Event) -> Result<()>,
    ) -> Result<()> {
        let tok = *st.generated.last().ok_or_else(|| CageError::InvalidArgument("no token pushed".into()))?;
        for (s, p) in inputs.iter_mut().enumerate() {
            p.clear();
            match &self.retokenized[plan.model_of(s)] {
                Some(rt) => p.extend_from_slice(&rt.pieces[tok as usize]),
                None => p.push(tok),
            }
        }
        let text = self.tokenizer.decode(&st.generated, true)?;
        if let Some(shown) = st.stop_check(tok, text, rule) {
            sink(Event::Text { row, text: &st.text[shown] })?;
        }
        Ok(())
    }

    /// One decoder per model that runs a stream, from the engine's pool: a KV-cache slot per row and stream,
    /// room for `positions` tokens per slot and for the chunk's prompts (at most `prefill_cap` tokens) in one
    /// call. Given back to the pool when the lease drops.
    fn decoders(
        &self,
        plan: &StreamPlan,
        inputs: &[Vec<Vec<u32>>],
        positions: usize,
        prefill_cap: usize,
        opts: &DecodeOptions,
    ) -> Result<Lease<'_>> {
        let b = inputs.len();
        let device = opts.model_device.resolve();
        let need: Vec<Option<Room>> = plan
            .on_model
            .iter()
            .map(|on| {
                if on.is_empty() {
                    return None;
                }
                let tokens: usize = inputs.iter().map(|p| on.iter().map(|&s| p[s].len()).sum::<usize>()).sum();
                let slots = b * on.len();
                let tokens = tokens.min(prefill_cap).max(slots);
                let gpu = crate::model::gpu::GpuOptions { kv_cache: opts.kv_cache, weights: opts.gpu_weights };
                Some(Room { device, gpu, slots, positions, tokens })
            })
            .collect();
        let models: Vec<&Arc<Model>> = self.models.iter().map(|(_, m)| m).collect();
        self.pool.lease(&models, &need)
    }

    /// How many decoders this engine has built (each one a weight upload on a GPU): one per model in use while
    /// requests keep within the largest shape seen.
    pub fn decoders_built(&self) -> usize {
        self.pool.built()
    }
}

/// The host-device traffic so far of `decoders`' devices and of the shared equilibrium device.
fn transfers(decoders: &[Option<Box<dyn Decoder + Send>>]) -> Transfers {
    decoders.iter().flatten().map(|d| d.transfers()).fold(crate::gpu::shared_transfers(), Transfers::plus)
}

/// The result of a row in state `st`.
fn row_result(req: &RowRequest, st: &RowState) -> RowResult {
    RowResult {
        prompt: req.prompt.clone(),
        weights: req.weights.clone(),
        text: st.text.clone(),
        tokens: st.generated.clone(),
        stop_reason: st.stop.unwrap_or(StopReason::Length),
        scores: st.scores.clone(),
    }
}

/// softmax of log-weights in f64 (entries of -inf get 0), by the crate's shared row primitive.
pub fn softmax(z: &[f64]) -> Vec<f64> {
    let mut p = z.to_vec();
    crate::softmax::softmax_in_place(&mut p);
    p
}
