//! The decoding loop. Per step: one forward per model covering every stream of every live row (base, ARMs with
//! their adapters, references, instructed prompts), candidate selection on the base, the principals' values,
//! the method's policy (the equilibrium on the chosen backend for `cage`), the token choice, and the stop
//! checks. Every method runs in this same loop with the same forwards, so their costs and outputs compare fairly.

use super::config::{DecodeMethod, FormatSetting, PrincipalKind, RunConfig, check_weights};
use super::principal::{ArmSource, LexiconSource, PromptedSource, StepView, StreamLogits, StreamSpec, ValueSource};
use crate::backend::{Backend, solve_with};
use crate::baselines::{ModDivergence, genarm, mod_policy};
use crate::candidates::{Selection, select};
use crate::error::{CageError, Result};
use crate::model::gpu::new_decoder;
use crate::model::{Adapter, Decoder, LogitsAt, Model, PromptFormat, Seq, Tokenizer};
use crate::problem::{Batch, BatchInput, Normalize};
use crate::sampling::{Choice, choose_row};
use crate::solver::{Method, SolveOptions};
use rayon::prelude::*;
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
    /// `eos`, `stop` or `length`.
    pub stop_reason: String,
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
        self.models.push((dir.to_path_buf(), Arc::new(model)));
        Ok(self.models.len() - 1)
    }

    /// Loads a LoRA adapter onto model `model` (unmerged) and returns its adapter id.
    pub fn attach_adapter(&mut self, model: usize, dir: &Path) -> Result<usize> {
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
        let names = self.principal_names();
        for r in rows {
            check_weights(&r.weights, &names)?;
        }
        if !(opts.tau.is_finite() && opts.tau > 0.0) {
            return Err(CageError::BadTau(opts.tau));
        }
        if opts.batch_size == 0 {
            return Err(CageError::InvalidArgument("batch_size must be >= 1".into()));
        }
        let mut out = Vec::with_capacity(rows.len());
        let mut total = Timings::default();
        for (c, chunk) in rows.chunks(opts.batch_size).enumerate() {
            let (res, t) = self.decode_chunk(chunk, c * opts.batch_size, opts, sink)?;
            out.extend(res);
            total.add(&t);
        }
        Ok((out, total))
    }

    fn decode_chunk(
        &self,
        rows: &[RowRequest],
        row0: usize,
        opts: &DecodeOptions,
        sink: &mut dyn FnMut(Event),
    ) -> Result<(Vec<RowResult>, Timings)> {
        let mut tm = Timings::default();
        let (b, nj) = (rows.len(), self.sources.len());
        // Streams: the base first, then every source's, shared when equal.
        let mut streams = vec![StreamSpec { model: 0, adapter: None, instruction: None }];
        let src_streams: Vec<Vec<usize>> = self
            .sources
            .iter()
            .map(|s| {
                s.streams()
                    .into_iter()
                    .map(|sp| match streams.iter().position(|x| *x == sp) {
                        Some(i) => i,
                        None => {
                            streams.push(sp);
                            streams.len() - 1
                        }
                    })
                    .collect()
            })
            .collect();
        for sp in &streams {
            if sp.model >= self.models.len() {
                return Err(CageError::InvalidArgument(format!(
                    "a principal names model {} that is not loaded",
                    sp.model
                )));
            }
        }
        let nm = self.models.len();
        let on_model: Vec<Vec<usize>> =
            (0..nm).map(|m| (0..streams.len()).filter(|&s| streams[s].model == m).collect()).collect();
        let mut local = vec![0; streams.len()];
        for list in &on_model {
            for (l, &s) in list.iter().enumerate() {
                local[s] = l;
            }
        }
        // Prompt ids per row and stream.
        let mut pending: Vec<Vec<Vec<u32>>> = Vec::with_capacity(b);
        for r in rows {
            pending.push(
                streams
                    .iter()
                    .map(|sp| self.stream_prompt(&r.prompt, sp.instruction.as_deref()))
                    .collect::<Result<_>>()?,
            );
        }
        let longest = pending.iter().flatten().map(Vec::len).max().unwrap_or(1);
        let prefill_cap = longest.max(1024);
        let mut decoders: Vec<Option<Box<dyn Decoder>>> = (0..nm)
            .map(|m| {
                let ns = on_model[m].len();
                if ns == 0 {
                    return Ok(None);
                }
                let total: usize = pending.iter().map(|p| on_model[m].iter().map(|&s| p[s].len()).sum::<usize>()).sum();
                new_decoder(
                    opts.model_device,
                    self.models[m].1.clone(),
                    b * ns,
                    longest + opts.max_new_tokens + 1,
                    total.min(prefill_cap).max(b * ns),
                )
                .map(Some)
            })
            .collect::<Result<_>>()?;
        let vocab: Vec<usize> = self.models.iter().map(|(_, m)| m.config.vocab_size).collect();
        let selection = if opts.k == 0 { Selection::All } else { Selection::TopK(opts.k) };
        let (mut generated, mut texts, mut emitted) = (vec![vec![]; b], vec![String::new(); b], vec![0usize; b]);
        let mut scores = vec![vec![0.0f64; nj]; b];
        let mut reason = vec![String::new(); b];
        let mut live: Vec<usize> = (0..b).collect();
        let mut bufs: Vec<Vec<f32>> = vec![vec![]; nm];
        let need_policy = matches!(opts.method, DecodeMethod::Genarm | DecodeMethod::Mod);
        let mut step = 0;
        while !live.is_empty() && step < opts.max_new_tokens {
            // Forwards: one batch per model, prefill split so one call holds at most `prefill_cap` tokens.
            let t0 = Instant::now();
            for m in 0..nm {
                let Some(dec) = decoders[m].as_mut() else { continue };
                let ns = on_model[m].len();
                let (streams, on) = (&streams, &on_model[m]);
                let seqs: Vec<Seq> = live
                    .iter()
                    .flat_map(|&r| {
                        let p = &pending[r];
                        on.iter().enumerate().map(move |(l, &s)| Seq {
                            slot: r * ns + l,
                            tokens: &p[s],
                            adapter: streams[s].adapter,
                        })
                    })
                    .collect();
                bufs[m].clear();
                let mut start = 0;
                while start < seqs.len() {
                    let (mut end, mut toks) = (start, 0);
                    while end < seqs.len() && (end == start || toks + seqs[end].tokens.len() <= prefill_cap) {
                        toks += seqs[end].tokens.len();
                        end += 1;
                    }
                    bufs[m].extend_from_slice(dec.forward(&seqs[start..end], LogitsAt::Last)?);
                    start = end;
                }
            }
            let fwd = t0.elapsed().as_secs_f64();
            tm.forward_s += fwd;
            if step == 0 {
                tm.prefill_s += fwd;
            }
            // Candidates and values per live row.
            let t1 = Instant::now();
            let row_logits = |m: usize, i: usize, s: usize| -> &[f32] {
                let (ns, v) = (on_model[m].len(), vocab[m]);
                let at = (i * ns + local[s]) * v;
                &bufs[m][at..at + v]
            };
            let nl = live.len();
            let mut cands = Vec::with_capacity(nl);
            let mut q = Vec::with_capacity(nl);
            let mut pols = Vec::with_capacity(nl);
            // The log-normalisers over the full vocabulary are most of this phase: one task per (row, stream).
            let ns_all = streams.len();
            let all_lse: Vec<f64> = (0..nl * ns_all)
                .into_par_iter()
                .map(|x| crate::softmax::logsumexp(row_logits(streams[x % ns_all].model, x / ns_all, x % ns_all)))
                .collect();
            for (i, &r) in live.iter().enumerate() {
                let c = select(row_logits(0, i, 0), selection)?;
                let n = c.ids.len();
                let lses = &all_lse[i * ns_all..(i + 1) * ns_all];
                let (mut qr, mut pr) = (vec![0.0f64; nj * n], vec![vec![]; nj]);
                for (j, src) in self.sources.iter().enumerate() {
                    let sl: Vec<StreamLogits> = src_streams[j]
                        .iter()
                        .map(|&s| StreamLogits { logits: row_logits(streams[s].model, i, s), lse: lses[s] })
                        .collect();
                    let view = StepView { row: row0 + r, generated: &generated[r], candidates: &c.ids, streams: &sl };
                    let qj = &mut qr[j * n..(j + 1) * n];
                    src.values(&view, qj)?;
                    if let Some((a, x)) = qj.iter().enumerate().find(|(_, x)| !x.is_finite()) {
                        return Err(CageError::NonFinite {
                            what: format!("values of principal {:?}", src.name()),
                            index: a,
                            value: format!("{x}"),
                        });
                    }
                    if need_policy {
                        let mut p = vec![0.0; n];
                        if !src.policy(&view, &mut p)? {
                            p.copy_from_slice(qj);
                        }
                        pr[j] = p;
                    }
                }
                cands.push(c);
                q.push(qr);
                pols.push(pr);
            }
            tm.values_s += t1.elapsed().as_secs_f64();
            // The method's policy.
            let t2 = Instant::now();
            let n = cands.first().map_or(0, |c| c.ids.len());
            let base_lp: Vec<Vec<f64>> =
                cands.iter().map(|c| c.base_logprobs.iter().map(|&x| x as f64).collect()).collect();
            let mut sol_info: Vec<(u32, f64, bool, Vec<String>)> = vec![(0, 0.0, true, vec![]); nl];
            let policies: Vec<Vec<f64>> = match opts.method {
                DecodeMethod::Base => base_lp.iter().map(|b| softmax(b)).collect(),
                DecodeMethod::Genarm => (0..nl)
                    .map(|i| {
                        let w: Vec<f64> = rows[live[i]].weights.clone();
                        let arms: Vec<&[f64]> = pols[i].iter().map(Vec::as_slice).collect();
                        genarm(&base_lp[i], &arms, &w)
                    })
                    .collect::<Result<_>>()?,
                DecodeMethod::Mod => (0..nl)
                    .map(|i| {
                        let w: Vec<f64> = rows[live[i]].weights.clone();
                        let ps: Vec<&[f64]> = pols[i].iter().map(Vec::as_slice).collect();
                        mod_policy(&ps, &w, ModDivergence::Reverse)
                    })
                    .collect::<Result<_>>()?,
                DecodeMethod::Linear | DecodeMethod::Cage | DecodeMethod::CagePaper => {
                    let method = match opts.method {
                        DecodeMethod::Linear => Method::Linear,
                        DecodeMethod::Cage => Method::Exact,
                        _ => Method::Paper,
                    };
                    let batch = Batch::new(BatchInput {
                        rows: nl,
                        candidates: n,
                        principals: nj,
                        base_logprobs: base_lp.concat(),
                        values: q.concat(),
                        weights: live.iter().flat_map(|&r| rows[r].weights.iter().copied()).collect(),
                        tau: vec![opts.tau],
                        normalize: opts.normalize,
                        names: self.principal_names(),
                    })?;
                    let sol = solve_with(opts.backend, &batch, &SolveOptions::new(method))?;
                    for (i, info) in sol_info.iter_mut().enumerate() {
                        let paid = (0..nj)
                            .filter(|&j| sol.incentive_row(i, j).iter().any(|&y| y > 0.0))
                            .map(|j| self.sources[j].name().to_string())
                            .collect();
                        *info = (sol.iterations[i], sol.residual[i], sol.converged[i], paid);
                    }
                    (0..nl).map(|i| sol.policy_row(i).to_vec()).collect()
                }
            };
            let pol_s = t2.elapsed().as_secs_f64();
            tm.policy_s += pol_s;
            // Token choice and stop checks.
            let t3 = Instant::now();
            let mut finished = vec![];
            for (i, &r) in live.iter().enumerate() {
                let pf: Vec<f32> = policies[i].iter().map(|&p| p as f32).collect();
                let a = choose_row(&pf, opts.choice, opts.seed, (row0 + r) as u32, step as u32)?;
                let tok = cands[i].ids[a];
                for j in 0..nj {
                    scores[r][j] += q[i][j * n + a];
                }
                generated[r].push(tok);
                tm.tokens += 1;
                for p in pending[r].iter_mut() {
                    p.clear();
                    p.push(tok);
                }
                if opts.diagnostics {
                    let pi0 = softmax(&base_lp[i]);
                    let kl = policies[i]
                        .iter()
                        .zip(&pi0)
                        .filter(|(p, _)| **p > 0.0)
                        .map(|(p, p0)| p * (p.ln() - p0.ln()))
                        .sum::<f64>()
                        .max(0.0);
                    let (iterations, residual, converged, paid) = sol_info[i].clone();
                    let d = StepDiag {
                        row: row0 + r,
                        step,
                        token: tok,
                        iterations,
                        residual,
                        converged,
                        paid,
                        kl,
                        forward_ms: fwd * 1e3,
                        policy_ms: pol_s * 1e3,
                    };
                    sink(Event::Step(&d));
                }
                let text = self.tokenizer.decode(&generated[r], true)?;
                let stop_at = opts.stop.iter().filter(|s| !s.is_empty()).filter_map(|s| text.find(s.as_str())).min();
                let mut done = None;
                if self.eos.contains(&tok) && !opts.ignore_eos {
                    done = Some("eos");
                }
                let text = match stop_at {
                    Some(at) => {
                        done = Some("stop");
                        text[..at].to_string()
                    }
                    None => text,
                };
                if done.is_none() && generated[r].len() >= opts.max_new_tokens {
                    done = Some("length");
                }
                // Hold back text that might be the start of a stop string or an incomplete character.
                let safe = if done.is_some() { text.len() } else { safe_prefix(&text, &opts.stop) };
                if safe > emitted[r] && text.is_char_boundary(emitted[r]) {
                    sink(Event::Text { row: row0 + r, text: &text[emitted[r]..safe] });
                    emitted[r] = safe;
                }
                texts[r] = text;
                if let Some(why) = done {
                    reason[r] = why.into();
                    finished.push(r);
                }
            }
            live.retain(|r| !finished.contains(r));
            for &r in &finished {
                sink(Event::RowDone { row: row0 + r });
            }
            tm.sampling_s += t3.elapsed().as_secs_f64();
            tm.steps += 1;
            step += 1;
        }
        for &r in &live {
            reason[r] = "length".into();
            sink(Event::RowDone { row: row0 + r });
        }
        let out = rows
            .iter()
            .enumerate()
            .map(|(r, req)| RowResult {
                prompt: req.prompt.clone(),
                weights: req.weights.clone(),
                text: std::mem::take(&mut texts[r]),
                tokens: std::mem::take(&mut generated[r]),
                stop_reason: std::mem::take(&mut reason[r]),
                scores: std::mem::take(&mut scores[r]),
            })
            .collect();
        Ok((out, tm))
    }
}

/// softmax of log-weights in f64 (entries of -inf get 0), by the crate's shared row primitive.
pub fn softmax(z: &[f64]) -> Vec<f64> {
    let mut p = z.to_vec();
    crate::softmax::softmax_in_place(&mut p);
    p
}

/// Length of the prefix of `text` that can be shown: it ends on a character boundary, before a trailing
/// replacement character (an incomplete UTF-8 sequence) and before any suffix that starts a stop string.
fn safe_prefix(text: &str, stop: &[String]) -> usize {
    let mut end = text.trim_end_matches('\u{FFFD}').len();
    for s in stop.iter().filter(|s| !s.is_empty()) {
        let mut cut = end;
        for (i, _) in text[..end].char_indices().rev().take(s.chars().count()) {
            if s.starts_with(&text[i..end]) {
                cut = i;
            }
        }
        end = cut;
    }
    end
}
