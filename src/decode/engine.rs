//! The decoding loop, over the stages of [`super::stages`]. Per step: one forward per model covering every
//! stream of every live row (base, ARMs with their adapters, references, instructed prompts), candidate
//! selection on the base, the principals' values, the method's policy (the equilibrium on the chosen backend
//! for `cage`), the token choice, and the stop checks. Every method runs in this same loop with the same
//! forwards, so their costs and outputs compare fairly.

use super::config::{DecodeMethod, FormatSetting, PrincipalKind, RunConfig, check_weights};
use super::pool::{DecoderPool, Lease, Room};
use super::principal::{ArmSource, LexiconSource, PromptedSource, StreamSpec, ValueSource};
use super::stages::{
    PolicyRule, RowCandidates, RowContext, RowState, RowValues, SolveInfo, StepLogits, StepPolicy, StopReason,
    StopRule, StreamPlan, choose, forward, kl_to_base, policy, values,
};
use crate::backend::Backend;
use crate::candidates::Selection;
use crate::error::{CageError, Result};
use crate::gpu::device::Transfers;
use crate::model::{Adapter, Decoder, Model, PromptFormat, Tokenizer};
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
    /// Rows decoded together.
    pub batch_size: usize,
    /// Emit a [`StepDiag`] per row and step.
    pub diagnostics: bool,
    /// Keep decoding after EOS (benchmarks: every method then decodes the same number of steps).
    pub ignore_eos: bool,
    /// The index of the first row in the whole run: rows are numbered (events, sampling keys) from here, so that
    /// a run split into shards (cage.ray) numbers and draws each row as the whole run does.
    pub first_row: usize,
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
            batch_size: cfg.batch_size,
            diagnostics: false,
            ignore_eos: false,
            first_row: 0,
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
    /// Candidate selection and the principals' values.
    pub values_s: f64,
    /// The method's policy (the equilibrium for `cage`).
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
    }
}

/// The base model, the principals' models and value sources, and the shared tokenizer.
pub struct Engine {
    models: Vec<(PathBuf, Arc<Model>)>,
    tokenizer: Tokenizer,
    tokenizer_model: Option<serde_json::Value>,
    tokenizer_override: bool,
    sources: Vec<Box<dyn ValueSource>>,
    format: PromptFormat,
    eos: Vec<u32>,
    /// The decoders, kept from call to call.
    pool: DecoderPool,
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

fn load_model(dir: &Path) -> Result<Model> {
    if !dir.join("config.json").is_file() {
        return Err(CageError::Model {
            model: dir.display().to_string(),
            msg: "no model here (config.json is missing); check the path, or run `cage fetch-model` for the default model"
                .into(),
        });
    }
    Model::load(dir)
}

impl Engine {
    /// An engine with the base model in `base` (model 0) and no principals. `tokenizer` overrides the folder
    /// holding `tokenizer.json`.
    pub fn new(base: &Path, tokenizer: Option<&Path>, prompt_format: FormatSetting) -> Result<Self> {
        let tdir = tokenizer.unwrap_or(base);
        let tok = Tokenizer::load(tdir)?;
        let format = prompt_format.resolve(&tok);
        let model = load_model(base)?;
        let mut eos: Vec<u32> = model.config.eos_token_ids.clone();
        eos.extend(tok.eos_id());
        Ok(Engine {
            models: vec![(base.to_path_buf(), Arc::new(model))],
            tokenizer_model: tokenizer_model(tdir)?,
            tokenizer: tok,
            tokenizer_override: tokenizer.is_some(),
            sources: vec![],
            format,
            eos,
            pool: DecoderPool::default(),
        })
    }

    /// Builds the engine a config describes: models (shared when paths agree), adapters, principals.
    pub fn from_config(cfg: &RunConfig) -> Result<Self> {
        cfg.check()?;
        let mut e = Engine::new(&cfg.base, cfg.tokenizer.as_deref(), cfg.prompt_format)?;
        for p in &cfg.principals {
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
            };
            e.add_source(src);
        }
        Ok(e)
    }

    /// Loads a model (or finds it already loaded) and returns its index. A model folder with its own
    /// `tokenizer.json` must use the base's tokenizer: the principals score the base's candidate ids.
    pub fn add_model(&mut self, dir: &Path) -> Result<usize> {
        let key = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        if let Some(i) = self.models.iter().position(|(p, _)| key(p) == key(dir)) {
            return Ok(i);
        }
        let model = load_model(dir)?;
        if !self.tokenizer_override
            && let (Some(mine), Some(theirs)) = (&self.tokenizer_model, tokenizer_model(dir)?)
            && *mine != theirs
        {
            return Err(CageError::Model {
                model: dir.display().to_string(),
                msg: format!(
                    "its tokenizer differs from the base model's ({}); base and principals must share a tokenizer",
                    self.models[0].0.display()
                ),
            });
        }
        // The principals score the base's candidate ids: a smaller vocabulary would fail at the first step.
        let base_vocab = self.models[0].1.config.vocab_size;
        if model.config.vocab_size < base_vocab {
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
        Ok(self.models.len() - 1)
    }

    /// Loads a LoRA adapter onto model `model` (unmerged) and returns its adapter id.
    pub fn attach_adapter(&mut self, model: usize, dir: &Path) -> Result<usize> {
        // Pooled decoders hold the model without the adapter (and share it): built anew at the next call.
        self.pool.clear();
        let (path, m) = self
            .models
            .get_mut(model)
            .ok_or_else(|| CageError::InvalidArgument(format!("no model with index {model}")))?;
        let m = Arc::get_mut(m).ok_or_else(|| CageError::Model {
            model: path.display().to_string(),
            msg: "adapters must be attached before decoding starts".into(),
        })?;
        let ad = Adapter::load(dir, m)?;
        m.attach_adapter(&ad)
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

    /// Prompt ids of a stream: the instruction, if any, goes before the user's prompt inside the same format.
    fn stream_prompt(&self, prompt: &str, instruction: Option<&str>) -> Result<Vec<u32>> {
        let text = match instruction {
            Some(i) => format!("{i}\n\n{prompt}"),
            None => prompt.to_string(),
        };
        let ids = self.tokenizer.prompt_ids(&text, self.format)?;
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
        let declared: Vec<Vec<StreamSpec>> = self.sources.iter().map(|s| s.streams()).collect();
        let plan = StreamPlan::new(&declared, self.models.len())?;
        let room: Vec<usize> =
            rows.iter().enumerate().map(|(i, r)| self.room(&plan, i, &r.prompt)).collect::<Result<_>>()?;
        let mut out = Vec::with_capacity(rows.len());
        let mut total = Timings::default();
        for (c, chunk) in rows.chunks(opts.batch_size).enumerate() {
            let at = c * opts.batch_size;
            let (res, t) = self.decode_chunk(chunk, opts.first_row + at, &room[at..at + chunk.len()], opts, sink)?;
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
            let n = self.stream_prompt(prompt, sp.instruction.as_deref())?.len();
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
            room = room.min(ctx - n);
        }
        Ok(room)
    }

    /// Decodes one chunk of rows together: the stages of [`super::stages`] in a loop over steps, on buffers
    /// allocated here once. `room` holds each row's [`Engine::room`].
    fn decode_chunk(
        &self,
        rows: &[RowRequest],
        row0: usize,
        room: &[usize],
        opts: &DecodeOptions,
        sink: &mut dyn FnMut(Event) -> Result<()>,
    ) -> Result<(Vec<RowResult>, Timings)> {
        let mut tm = Timings::default();
        let (b, nj) = (rows.len(), self.sources.len());
        let declared: Vec<Vec<StreamSpec>> = self.sources.iter().map(|s| s.streams()).collect();
        let plan = StreamPlan::new(&declared, self.models.len())?;
        // What each row feeds each stream at the next forward: its prompt, then its last token.
        let mut inputs: Vec<Vec<Vec<u32>>> = Vec::with_capacity(b);
        for r in rows {
            inputs.push(
                plan.streams
                    .iter()
                    .map(|sp| self.stream_prompt(&r.prompt, sp.instruction.as_deref()))
                    .collect::<Result<_>>()?,
            );
        }
        let longest = inputs.iter().flatten().map(Vec::len).max().unwrap_or(1);
        let prefill_cap = longest.max(1024);
        // Positions per KV slot: never more than the longest context (a huge max_new_tokens must not allocate).
        let max_ctx = self.models.iter().map(|(_, m)| m.config.max_position_embeddings).max().unwrap_or(0);
        let positions = (longest + opts.max_new_tokens.min(max_ctx) + 1).min(max_ctx + 1);
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
            StepLogits::new(self.models.iter().map(|(_, m)| m.config.vocab_size).collect(), plan.streams.len());
        let mut cands = vec![RowCandidates::default(); b];
        let mut vals = vec![RowValues::default(); b];
        let mut weights: Vec<f64> = Vec::with_capacity(b * nj);
        let mut pol = StepPolicy::default();
        let mut scratch: Vec<f32> = vec![];
        let mut states: Vec<RowState> =
            room.iter().map(|&n| RowState::new(nj, opts.max_new_tokens.min(n).min(1 << 16))).collect();
        let mut live: Vec<usize> = (0..b).collect();
        // Transfers at the start of step 1, once the prefill is done.
        let mut counted = None;
        for step in 0..opts.max_new_tokens {
            if live.is_empty() {
                break;
            }
            let nl = live.len();
            // Forward: one batch per model over every live row's streams.
            let t0 = Instant::now();
            if step == 1 {
                counted = Some(transfers(decoders));
            }
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
                let st = &mut states[r];
                st.push(tok, &vals[i], a, pol.candidates);
                tm.tokens += 1;
                for p in inputs[r].iter_mut() {
                    p.clear();
                    p.push(tok);
                }
                if opts.diagnostics {
                    let kl = kl_to_base(pol.row(i), &cands[i].base_logprobs);
                    let d = StepDiag::new(row0 + r, step, tok, &pol.info[i], &names, kl, (fwd, pol_s));
                    sink(Event::Step(&d))?;
                }
                let text = self.tokenizer.decode(&st.generated, true)?;
                if let Some(shown) = st.stop_check(tok, text, &StopRule { context: room[r], ..stop }) {
                    sink(Event::Text { row: row0 + r, text: &st.text[shown] })?;
                }
            }
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
        for &r in &live {
            states[r].stop = Some(StopReason::Length);
            sink(Event::RowDone { row: row0 + r, result: &row_result(&rows[r], &states[r]) })?;
        }
        Ok((rows.iter().zip(&states).map(|(req, st)| row_result(req, st)).collect(), tm))
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
                Some(Room { device, slots, positions, tokens: tokens.min(prefill_cap).max(slots) })
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
