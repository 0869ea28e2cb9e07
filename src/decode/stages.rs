//! The stages of one decoding step, in data-flow order, each a function or a method over named buffers that
//! [`Engine`](super::Engine)'s loop allocates once per chunk of rows and refills at every step:
//!
//! | stage      | reads                                    | writes                                              |
//! |------------|------------------------------------------|-----------------------------------------------------|
//! | streams    | the streams each principal declares      | [`StreamPlan`]: the streams per model, their slots  |
//! | forward    | the decoders, each live row's new tokens | [`StepLogits`]: the last position's logits          |
//! | candidates | the base stream's logits                 | [`RowCandidates`]: top-k ids, log pi0               |
//! | values     | every stream's logits at the candidates  | [`RowValues`]: each principal's q (and policy)      |
//! | policy     | candidates, values, weights, the method  | [`StepPolicy`]: pi per row and [`SolveInfo`]        |
//! | choice     | one row of the policy                    | a candidate index ([`choose`])                      |
//! | stop       | the row's token and text                 | [`RowState`]: text, showable part, [`StopReason`]   |

use super::config::DecodeMethod;
use super::principal::{StepView, StreamLogits, StreamSpec, ValueSource};
use crate::backend::{Backend, solve_with};
use crate::baselines::{ModDivergence, genarm, mod_policy};
use crate::candidates::{Selection, select};
use crate::error::{CageError, Result};
use crate::model::{Decoder, LogitsAt, Seq};
use crate::problem::{Batch, BatchInput, Normalize};
use crate::sampling::{Choice, choose_row};
use crate::solver::{Method, SolveOptions};
use rayon::prelude::*;
use std::ops::Range;
use std::sync::Arc;

// ---- streams ----------------------------------------------------------------------------------------------

/// Which forward streams each model runs. Stream 0 is the base model alone (its logits give the candidates);
/// the principals' streams follow, one forward shared by every principal that declares the same stream. A
/// model's decoder holds, row after row, one KV-cache slot per stream on that model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamPlan {
    /// Every distinct stream, the base first.
    pub streams: Vec<StreamSpec>,
    /// Per principal: its streams (indices into `streams`), in the order it declared them.
    pub of_source: Vec<Vec<usize>>,
    /// Per model: the streams it runs, in slot order.
    pub on_model: Vec<Vec<usize>>,
    /// Per stream: its index among its model's streams.
    local: Vec<usize>,
}

impl StreamPlan {
    /// The plan for principals declaring `declared` (one list per principal) on an engine of `models` models.
    pub fn new(declared: &[Vec<StreamSpec>], models: usize) -> Result<Self> {
        let mut streams = vec![StreamSpec { model: 0, adapter: None, instruction: None }];
        let mut of_source = Vec::with_capacity(declared.len());
        for specs in declared {
            let mut mine = Vec::with_capacity(specs.len());
            for sp in specs {
                mine.push(match streams.iter().position(|x| x == sp) {
                    Some(i) => i,
                    None => {
                        streams.push(sp.clone());
                        streams.len() - 1
                    }
                });
            }
            of_source.push(mine);
        }
        if let Some(sp) = streams.iter().find(|sp| sp.model >= models) {
            return Err(CageError::InvalidArgument(format!("a principal names model {} that is not loaded", sp.model)));
        }
        let on_model: Vec<Vec<usize>> =
            (0..models).map(|m| (0..streams.len()).filter(|&s| streams[s].model == m).collect()).collect();
        let mut local = vec![0; streams.len()];
        for list in &on_model {
            for (l, &s) in list.iter().enumerate() {
                local[s] = l;
            }
        }
        Ok(StreamPlan { streams, of_source, on_model, local })
    }

    /// The model stream `s` runs on.
    pub fn model_of(&self, s: usize) -> usize {
        self.streams[s].model
    }

    /// Where row `row`'s stream `s` sits on its model: the KV-cache slot for the row's index in the chunk, and
    /// the logits row for its index among the live rows (rows one after another, each with the model's streams).
    pub fn position(&self, row: usize, s: usize) -> usize {
        row * self.on_model[self.model_of(s)].len() + self.local[s]
    }

    /// The sequences model `m`'s forward call takes for the `live` rows: each row's input (`inputs[row][s]`)
    /// on every stream of that model, in [`StreamPlan::position`] order, each in its KV-cache slot.
    pub fn seqs<'a>(&self, m: usize, live: &[usize], inputs: &'a [Vec<Vec<u32>>]) -> Vec<Seq<'a>> {
        let on = &self.on_model[m];
        live.iter()
            .flat_map(|&r| {
                on.iter().map(move |&s| Seq {
                    slot: self.position(r, s),
                    tokens: &inputs[r][s],
                    adapter: self.streams[s].adapter,
                })
            })
            .collect()
    }
}

// ---- forward ----------------------------------------------------------------------------------------------

/// The forward passes of one step: per model, one logits row per live row and stream on that model (in
/// [`StreamPlan::position`] order), and the log-normaliser of every (live row, stream).
#[derive(Clone, Debug)]
pub struct StepLogits {
    per_model: Vec<Vec<f32>>,
    vocab: Vec<usize>,
    lse: Vec<f64>,
    streams: usize,
    /// Per model, its id of each base id when it has its own tokenizer (see [`StreamLogits::ids`]).
    ids: Vec<Option<Arc<[u32]>>>,
}

impl StepLogits {
    /// Empty buffers for models of vocabularies `vocab`, `streams` streams.
    pub fn new(vocab: Vec<usize>, streams: usize) -> Self {
        StepLogits { per_model: vec![vec![]; vocab.len()], ids: vec![None; vocab.len()], vocab, lse: vec![], streams }
    }

    /// The same, with `ids[m]` the id map of model `m` when it reads text with its own tokenizer.
    pub fn with_ids(mut self, ids: Vec<Option<Arc<[u32]>>>) -> Self {
        self.ids = ids;
        self
    }

    /// The full-vocabulary logits of live row `i`'s stream `s`.
    pub fn logits(&self, plan: &StreamPlan, i: usize, s: usize) -> &[f32] {
        logits_row(&self.per_model, &self.vocab, plan, i, s)
    }

    /// Live row `i`'s stream `s` with its log-normaliser (after [`StepLogits::normalise`]).
    pub fn stream(&self, plan: &StreamPlan, i: usize, s: usize) -> StreamLogits<'_> {
        StreamLogits {
            logits: self.logits(plan, i, s),
            lse: self.lse[i * self.streams + s],
            ids: self.ids[plan.model_of(s)].as_deref(),
        }
    }

    /// The log-normalisers over the full vocabulary of `live` rows' streams: most of the values phase, so one
    /// task per (row, stream).
    pub fn normalise(&mut self, plan: &StreamPlan, live: usize) {
        let ns = self.streams;
        let StepLogits { per_model, vocab, lse, .. } = self;
        lse.clear();
        lse.resize(live * ns, 0.0);
        lse.par_iter_mut().enumerate().for_each(|(x, l)| {
            *l = crate::softmax::logsumexp(logits_row(per_model, vocab, plan, x / ns, x % ns));
        });
    }
}

fn logits_row<'a>(per_model: &'a [Vec<f32>], vocab: &[usize], plan: &StreamPlan, i: usize, s: usize) -> &'a [f32] {
    let m = plan.model_of(s);
    let (v, at) = (vocab[m], plan.position(i, s) * vocab[m]);
    &per_model[m][at..at + v]
}

/// The ranges of `lens` (tokens per sequence) that one forward call takes: consecutive sequences holding at
/// most `cap` tokens together, and at least one sequence each.
pub fn calls_within(lens: &[usize], cap: usize) -> Vec<Range<usize>> {
    let mut out = vec![];
    let mut start = 0;
    while start < lens.len() {
        let (mut end, mut toks) = (start, 0);
        while end < lens.len() && (end == start || toks + lens[end] <= cap) {
            toks += lens[end];
            end += 1;
        }
        out.push(start..end);
        start = end;
    }
    out
}

/// The forward stage: every model's decoder runs the streams it holds for the `live` rows, fed
/// `inputs[row][stream]` (the prompts at the first step, then the row's last token); at most `prefill_cap`
/// tokens go into one call. Fills `out` with the last position's logits.
pub fn forward(
    decoders: &mut [Option<Box<dyn Decoder + Send>>],
    plan: &StreamPlan,
    live: &[usize],
    inputs: &[Vec<Vec<u32>>],
    prefill_cap: usize,
    out: &mut StepLogits,
) -> Result<()> {
    for (m, dec) in decoders.iter_mut().enumerate() {
        let buf = &mut out.per_model[m];
        buf.clear();
        let Some(dec) = dec.as_mut() else { continue };
        let seqs = plan.seqs(m, live, inputs);
        let lens: Vec<usize> = seqs.iter().map(|q| q.tokens.len()).collect();
        for call in calls_within(&lens, prefill_cap) {
            buf.extend_from_slice(dec.forward(&seqs[call], LogitsAt::Last)?);
        }
    }
    Ok(())
}

// ---- candidates -------------------------------------------------------------------------------------------

/// One live row's candidates: the base model's top-k token ids (most likely first) and their log pi0.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RowCandidates {
    /// Token ids.
    pub ids: Vec<u32>,
    /// log pi0 at `ids` over the full vocabulary (computed in f32, as the kernels do).
    pub base_logprobs: Vec<f64>,
}

impl RowCandidates {
    /// The candidates stage of one row: selects from the base stream's logits.
    pub fn select(&mut self, base_logits: &[f32], selection: Selection) -> Result<()> {
        let c = select(base_logits, selection)?;
        self.ids = c.ids;
        self.base_logprobs.clear();
        self.base_logprobs.extend(c.base_logprobs.iter().map(|&x| x as f64));
        Ok(())
    }

    /// N.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether there is no candidate.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

// ---- values -----------------------------------------------------------------------------------------------

/// The principals' raw values at one live row's candidates, J x N, and their own policies (J x N
/// log-probabilities, a principal's values where it has none) when the method needs them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RowValues {
    /// q_j(a), principal-major.
    pub q: Vec<f64>,
    /// The principals' own policies (used by `genarm` and `mod`; empty otherwise).
    pub own: Vec<f64>,
    /// The `parm` method's guide: log pi_PARM(a | the row's preference) (empty for other methods).
    pub guide: Vec<f64>,
}

impl RowValues {
    /// Principal `j`'s values.
    pub fn principal(&self, j: usize, n: usize) -> &[f64] {
        &self.q[j * n..(j + 1) * n]
    }
}

/// What the values stage reads of each live row: its index in the decode call and its tokens so far.
#[derive(Clone, Copy, Debug)]
pub struct RowContext<'a> {
    /// Row index in the decode call.
    pub row: usize,
    /// Tokens generated so far.
    pub generated: &'a [u32],
}

/// The values stage: every principal's values (and own policy when `own_policies`) at each live row's
/// candidates; a non-finite value is an error naming the principal.
pub fn values(
    sources: &[Box<dyn ValueSource>],
    plan: &StreamPlan,
    logits: &StepLogits,
    rows: &[RowContext],
    cands: &[RowCandidates],
    own_policies: bool,
    out: &mut [RowValues],
) -> Result<()> {
    let nj = sources.len();
    let mut streams: Vec<StreamLogits> = Vec::with_capacity(plan.streams.len());
    for (i, ((ctx, c), v)) in rows.iter().zip(cands).zip(out.iter_mut()).enumerate() {
        let n = c.len();
        v.q.clear();
        v.q.resize(nj * n, 0.0);
        v.own.clear();
        if own_policies {
            v.own.resize(nj * n, 0.0);
        }
        for (j, src) in sources.iter().enumerate() {
            streams.clear();
            streams.extend(plan.of_source[j].iter().map(|&s| logits.stream(plan, i, s)));
            let view = StepView { row: ctx.row, generated: ctx.generated, candidates: &c.ids, streams: &streams };
            let qj = &mut v.q[j * n..(j + 1) * n];
            src.values(&view, qj)?;
            if let Some((a, x)) = qj.iter().enumerate().find(|(_, x)| !x.is_finite()) {
                return Err(CageError::NonFinite {
                    what: format!("values of principal {:?}", src.name()),
                    index: a,
                    value: format!("{x}"),
                });
            }
            if own_policies {
                let pj = &mut v.own[j * n..(j + 1) * n];
                if !src.policy(&view, pj)? {
                    pj.copy_from_slice(qj);
                }
            }
        }
    }
    Ok(())
}

/// The `parm` method's guide at each live row's candidates: log pi_PARM from live row `i`'s stream
/// `streams[i]` (the PARM adapter at its preference).
pub fn guide(
    plan: &StreamPlan,
    logits: &StepLogits,
    streams: &[usize],
    cands: &[RowCandidates],
    out: &mut [RowValues],
) -> Result<()> {
    for (i, ((&s, c), v)) in streams.iter().zip(cands).zip(out.iter_mut()).enumerate() {
        let st = logits.stream(plan, i, s);
        v.guide.clear();
        for &id in &c.ids {
            v.guide.push(st.logprob(id)?);
        }
    }
    Ok(())
}

// ---- policy -----------------------------------------------------------------------------------------------

/// What the equilibrium solver reports for one row (zeros and `converged` for methods without a solver).
#[derive(Clone, Debug, PartialEq)]
pub struct SolveInfo {
    /// Solver iterations.
    pub iterations: u32,
    /// Relative residual.
    pub residual: f64,
    /// Whether the solver converged.
    pub converged: bool,
    /// The principals (indices) that paid a positive incentive somewhere.
    pub paid: Vec<usize>,
}

impl Default for SolveInfo {
    fn default() -> Self {
        SolveInfo { iterations: 0, residual: 0.0, converged: true, paid: vec![] }
    }
}

/// The policy of every live row, rows x candidates, and the solver's report per row.
#[derive(Clone, Debug, Default)]
pub struct StepPolicy {
    /// N.
    pub candidates: usize,
    /// pi, row-major.
    pub policy: Vec<f64>,
    /// One report per row.
    pub info: Vec<SolveInfo>,
}

impl StepPolicy {
    /// Row `i`'s policy.
    pub fn row(&self, i: usize) -> &[f64] {
        &self.policy[i * self.candidates..(i + 1) * self.candidates]
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.info.len()
    }
}

/// How the policy stage forms a row's policy.
#[derive(Clone, Copy, Debug)]
pub struct PolicyRule<'a> {
    /// The method.
    pub method: DecodeMethod,
    /// The agent's temperature.
    pub tau: f64,
    /// Value preprocessing.
    pub normalize: Normalize,
    /// Where the equilibrium runs.
    pub backend: Backend,
    /// The principals' names (for error messages).
    pub names: &'a [String],
    /// The `parm` method's beta.
    pub parm_beta: f64,
}

/// The policy stage: the method's policy of each row from its candidates, values and weights (`weights` holds
/// J per row, row-major). Every row has the same number of candidates.
pub fn policy(
    rule: &PolicyRule,
    cands: &[RowCandidates],
    values: &[RowValues],
    weights: &[f64],
    out: &mut StepPolicy,
) -> Result<()> {
    let (nl, nj) = (cands.len(), rule.names.len());
    let n = cands.first().map_or(0, RowCandidates::len);
    if let Some(c) = cands.iter().find(|c| c.len() != n) {
        return Err(CageError::Shape {
            what: "candidates of a decoding step's rows".into(),
            expected: n,
            got: c.len(),
        });
    }
    out.candidates = n;
    out.policy.clear();
    out.info.clear();
    out.info.resize(nl, SolveInfo::default());
    let w = |i: usize| &weights[i * nj..(i + 1) * nj];
    let own = |i: usize| -> Vec<&[f64]> { (0..nj).map(|j| &values[i].own[j * n..(j + 1) * n]).collect() };
    match rule.method {
        DecodeMethod::Base => {
            for c in cands {
                let at = out.policy.len();
                out.policy.extend_from_slice(&c.base_logprobs);
                crate::softmax::softmax_in_place(&mut out.policy[at..]);
            }
        }
        DecodeMethod::Genarm => {
            for (i, c) in cands.iter().enumerate() {
                out.policy.extend(genarm(&c.base_logprobs, &own(i), w(i))?);
            }
        }
        DecodeMethod::Mod => {
            for i in 0..nl {
                out.policy.extend(mod_policy(&own(i), w(i), ModDivergence::Reverse)?);
            }
        }
        DecodeMethod::Parm => {
            for (c, v) in cands.iter().zip(values) {
                if v.guide.len() != n {
                    return Err(CageError::Shape {
                        what: "the parm guide's values".into(),
                        expected: n,
                        got: v.guide.len(),
                    });
                }
                let at = out.policy.len();
                out.policy.extend(c.base_logprobs.iter().zip(&v.guide).map(|(b, g)| b + g / rule.parm_beta));
                crate::softmax::softmax_in_place(&mut out.policy[at..]);
            }
        }
        DecodeMethod::Linear | DecodeMethod::Cage | DecodeMethod::CagePaper => {
            let method = match rule.method {
                DecodeMethod::Linear => Method::Linear,
                DecodeMethod::Cage => Method::Exact,
                _ => Method::Paper,
            };
            let batch = Batch::new(BatchInput {
                rows: nl,
                candidates: n,
                principals: nj,
                base_logprobs: cands.iter().flat_map(|c| c.base_logprobs.iter().copied()).collect(),
                values: values.iter().flat_map(|v| v.q.iter().copied()).collect(),
                weights: weights.to_vec(),
                tau: vec![rule.tau],
                normalize: rule.normalize,
                names: rule.names.to_vec(),
            })?;
            // `backend` says where the equilibrium runs; the linear tilt has none and runs on the CPU.
            let backend = if crate::backend::runs_on_gpu(method) { rule.backend } else { Backend::Cpu };
            let sol = solve_with(backend, &batch, &SolveOptions::new(method))?;
            for (i, info) in out.info.iter_mut().enumerate() {
                info.iterations = sol.iterations[i];
                info.residual = sol.residual[i];
                info.converged = sol.converged[i];
                info.paid.extend((0..nj).filter(|&j| sol.incentive_row(i, j).iter().any(|&y| y > 0.0)));
            }
            out.policy.extend_from_slice(&sol.policy[..nl * n]);
        }
    }
    Ok(())
}

// ---- choice -----------------------------------------------------------------------------------------------

/// The choice stage: the candidate index picked from one row's policy (in f32, as the kernels see it), the
/// draw keyed by (seed, row, step). `scratch` is reused across calls.
pub fn choose(
    policy: &[f64],
    choice: Choice,
    seed: u64,
    row: usize,
    step: usize,
    scratch: &mut Vec<f32>,
) -> Result<usize> {
    scratch.clear();
    scratch.extend(policy.iter().map(|&p| p as f32));
    choose_row(scratch, choice, seed, row as u32, step as u32)
}

/// KL(pi || pi0) over one row's candidates (diagnostics).
pub fn kl_to_base(policy: &[f64], base_logprobs: &[f64]) -> f64 {
    let mut pi0 = base_logprobs.to_vec();
    crate::softmax::softmax_in_place(&mut pi0);
    policy.iter().zip(&pi0).filter(|(p, _)| **p > 0.0).map(|(p, p0)| p * (p.ln() - p0.ln())).sum::<f64>().max(0.0)
}

// ---- stop -------------------------------------------------------------------------------------------------

/// Why a row stopped; spelled `eos`, `stop`, `length` and `context` in the JSON lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum StopReason {
    /// The model emitted an end-of-sequence token.
    Eos,
    /// The text reached a stop string (it is cut before it).
    Stop,
    /// The token limit.
    Length,
    /// The sequence (prompt and generated tokens) filled a model's context (`max_position_embeddings`).
    Context,
}

crate::spelled!(StopReason, "stop reason");

/// When rows stop.
#[derive(Clone, Copy, Debug)]
pub struct StopRule<'a> {
    /// End-of-sequence token ids.
    pub eos: &'a [u32],
    /// Stop strings (empty ones are ignored).
    pub stop: &'a [String],
    /// Token limit per row.
    pub max_new_tokens: usize,
    /// Keep decoding after EOS (benchmarks).
    pub ignore_eos: bool,
    /// Tokens the row can generate before its longest stream fills its model's context (`usize::MAX`: no
    /// limit); reached before `max_new_tokens`, the row stops with [`StopReason::Context`].
    pub context: usize,
}

/// One row's progress through a decode call.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RowState {
    /// Generated token ids (including a final EOS).
    pub generated: Vec<u32>,
    /// Generated text (special tokens dropped, cut before a stop string).
    pub text: String,
    /// Bytes of `text` already shown.
    pub emitted: usize,
    /// Per principal: the sum of its values at the chosen tokens.
    pub scores: Vec<f64>,
    /// Why the row stopped, once it has.
    pub stop: Option<StopReason>,
}

impl RowState {
    /// A row with no tokens yet, scoring `principals` principals, with room for `max_new_tokens`.
    pub fn new(principals: usize, max_new_tokens: usize) -> Self {
        RowState { generated: Vec::with_capacity(max_new_tokens), scores: vec![0.0; principals], ..RowState::default() }
    }

    /// Appends `token`, adding each principal's value there (`values`, one per principal) to its score: the
    /// resident step's report.
    pub fn push_values(&mut self, token: u32, values: &[f32]) {
        for (s, &v) in self.scores.iter_mut().zip(values) {
            *s += v as f64;
        }
        self.generated.push(token);
    }

    /// Appends the token at candidate `a`, adding each principal's value there to its score.
    pub fn push(&mut self, token: u32, values: &RowValues, a: usize, candidates: usize) {
        for (j, s) in self.scores.iter_mut().enumerate() {
            *s += values.principal(j, candidates)[a];
        }
        self.generated.push(token);
    }

    /// The stop stage, after [`RowState::push`] of `token` and with `text` the detokenised generation: the
    /// row stops on an EOS token (unless ignored), at a stop string (the text is cut before it; this wins over
    /// EOS) or at the token limit. Keeps the text and returns the range of it newly shown, if any: all of it
    /// once the row stops, else up to [`safe_prefix`].
    pub fn stop_check(&mut self, token: u32, text: String, rule: &StopRule) -> Option<Range<usize>> {
        let mut text = text;
        let stop_at = rule.stop.iter().filter(|s| !s.is_empty()).filter_map(|s| text.find(s.as_str())).min();
        let mut done = None;
        if rule.eos.contains(&token) && !rule.ignore_eos {
            done = Some(StopReason::Eos);
        }
        if let Some(at) = stop_at {
            done = Some(StopReason::Stop);
            text.truncate(at);
        }
        if done.is_none() && self.generated.len() >= rule.max_new_tokens {
            done = Some(StopReason::Length);
        }
        if done.is_none() && self.generated.len() >= rule.context {
            done = Some(StopReason::Context);
        }
        let safe = if done.is_some() { text.len() } else { safe_prefix(&text, rule.stop) };
        let shown = (safe > self.emitted && text.is_char_boundary(self.emitted)).then_some(self.emitted..safe);
        if let Some(r) = &shown {
            self.emitted = r.end;
        }
        self.text = text;
        self.stop = done;
        shown
    }
}

/// Length of the prefix of `text` that can be shown: it ends on a character boundary, before a trailing
/// replacement character (an incomplete UTF-8 sequence) and before any suffix that starts a stop string.
pub fn safe_prefix(text: &str, stop: &[String]) -> usize {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(model: usize, adapter: Option<usize>, instruction: Option<&str>) -> StreamSpec {
        StreamSpec { model, adapter, instruction: instruction.map(str::to_string) }
    }

    #[test]
    fn stream_planning_shares_identical_streams() {
        let base = spec(0, None, None);
        let arm = spec(0, Some(0), None);
        let told = spec(0, None, Some("be brief"));
        let small = spec(1, None, Some("be brief"));
        // An ARM (arm, base), a prompted principal (told, base), the same prompted principal again, one on
        // model 1 (small, model 1 alone), and a lexicon (no streams).
        let declared = vec![
            vec![arm.clone(), base.clone()],
            vec![told.clone(), base.clone()],
            vec![told.clone(), base],
            vec![small.clone(), spec(1, None, None)],
        ];
        let mut with_lexicon = declared.clone();
        with_lexicon.push(vec![]);
        let p = StreamPlan::new(&with_lexicon, 2).unwrap();
        assert_eq!(p.streams.len(), 5, "{:?}", p.streams);
        assert_eq!(p.of_source, [vec![1, 0], vec![2, 0], vec![2, 0], vec![3, 4], vec![]]);
        assert_eq!(p.on_model, [vec![0, 1, 2], vec![3, 4]]);
        // Row r's streams on a model are consecutive slots: 3 per row on model 0, 2 on model 1.
        assert_eq!([p.position(0, 0), p.position(0, 2), p.position(1, 0), p.position(1, 2)], [0, 2, 3, 5]);
        assert_eq!([p.position(0, 3), p.position(2, 4)], [0, 5]);
        // A model index past the loaded ones is refused.
        let e = StreamPlan::new(&declared, 1).unwrap_err().to_string();
        assert!(e.contains("model 1"), "{e}");
        // No principal: the base alone.
        let p = StreamPlan::new(&[], 1).unwrap();
        assert_eq!((p.streams.len(), p.on_model.clone()), (1, vec![vec![0]]));
    }

    #[test]
    fn forward_calls_hold_at_most_the_cap() {
        assert_eq!(calls_within(&[3, 3, 3], 6), [0..2, 2..3]);
        // A sequence longer than the cap still runs, alone.
        assert_eq!(calls_within(&[10, 1, 1], 4), [0..1, 1..3]);
        assert_eq!(calls_within(&[1; 4], 100), vec![Range { start: 0, end: 4 }]);
        assert!(calls_within(&[], 4).is_empty());
    }

    fn rule<'a>(eos: &'a [u32], stop: &'a [String], max: usize) -> StopRule<'a> {
        StopRule { eos, stop, max_new_tokens: max, ignore_eos: false, context: usize::MAX }
    }

    /// Feeds `tokens` with the texts a detokeniser would give after each, returning what is shown each time.
    fn feed(st: &mut RowState, steps: &[(u32, &str)], rule: &StopRule) -> Vec<String> {
        let mut shown = vec![];
        for &(tok, text) in steps {
            st.generated.push(tok);
            if let Some(r) = st.stop_check(tok, text.to_string(), rule) {
                shown.push(st.text[r].to_string());
            }
            if st.stop.is_some() {
                break;
            }
        }
        shown
    }

    #[test]
    fn the_stop_stage_stops_on_eos_stop_strings_and_length() {
        let stop = vec!["END".to_string()];
        // EOS: the row stops, all of its text is shown.
        let mut st = RowState::new(0, 8);
        let shown = feed(&mut st, &[(5, "a"), (6, "a b"), (2, "a b")], &rule(&[2], &stop, 8));
        assert_eq!((st.stop, st.text.as_str(), shown.concat()), (Some(StopReason::Eos), "a b", "a b".into()));
        // With ignore_eos the EOS token is an ordinary one.
        let mut st = RowState::new(0, 8);
        let r = StopRule { ignore_eos: true, ..rule(&[2], &stop, 8) };
        feed(&mut st, &[(2, "a")], &r);
        assert_eq!(st.stop, None);
        // A stop string cuts the text before it and wins over EOS in the same step.
        let mut st = RowState::new(0, 8);
        let shown = feed(&mut st, &[(5, "x E"), (2, "x END y")], &rule(&[2], &stop, 8));
        assert_eq!((st.stop, st.text.as_str()), (Some(StopReason::Stop), "x "));
        // "E" might start "END": held back at first, then shown only up to the cut.
        assert_eq!(shown, ["x "]);
        // The token limit.
        let mut st = RowState::new(0, 2);
        feed(&mut st, &[(5, "a"), (6, "a b"), (7, "a b c")], &rule(&[2], &stop, 2));
        assert_eq!((st.stop, st.generated.len(), st.text.as_str()), (Some(StopReason::Length), 2, "a b"));
    }

    #[test]
    fn a_row_that_fills_the_context_stops_with_its_own_reason() {
        let stop = vec![];
        let mut st = RowState::new(0, 8);
        let shown =
            feed(&mut st, &[(5, "a"), (6, "a b"), (7, "a b c")], &StopRule { context: 2, ..rule(&[2], &stop, 8) });
        assert_eq!((st.stop, st.generated.len(), shown.concat()), (Some(StopReason::Context), 2, "a b".into()));
        // The token limit, when it comes first or at the same token, is the reason given.
        let mut st = RowState::new(0, 8);
        feed(&mut st, &[(5, "a"), (6, "a b")], &StopRule { context: 2, ..rule(&[2], &stop, 2) });
        assert_eq!(st.stop, Some(StopReason::Length));
    }

    #[test]
    fn held_back_text_is_shown_once_it_cannot_start_a_stop_string() {
        let stop = vec!["<end>".to_string()];
        assert_eq!(safe_prefix("hello <e", &stop), "hello ".len());
        assert_eq!(safe_prefix("hello <x", &stop), "hello <x".len());
        assert_eq!(safe_prefix("hello <", &stop), "hello ".len());
        // An incomplete UTF-8 sequence decodes to U+FFFD: held back.
        assert_eq!(safe_prefix("caf\u{FFFD}", &[]), 3);
        // Empty stop strings hold nothing back.
        assert_eq!(safe_prefix("abc", &[String::new()]), 3);
        let mut st = RowState::new(0, 8);
        let shown = feed(&mut st, &[(5, "hi <e"), (6, "hi <ex"), (7, "hi <ex!")], &rule(&[], &stop, 3));
        assert_eq!(shown, ["hi ", "<ex", "!"]);
        assert_eq!(st.emitted, st.text.len());
    }

    #[test]
    fn scores_add_the_values_at_the_chosen_candidates() {
        let v = RowValues { q: vec![1.0, 2.0, 3.0, -1.0, -2.0, -3.0], own: vec![], guide: vec![] };
        let mut st = RowState::new(2, 4);
        st.push(40, &v, 2, 3);
        st.push(41, &v, 0, 3);
        assert_eq!((st.generated.clone(), st.scores.clone()), (vec![40, 41], vec![4.0, -4.0]));
    }

    fn two_rows() -> (Vec<RowCandidates>, Vec<RowValues>, Vec<f64>) {
        let cands = vec![
            RowCandidates { ids: vec![7, 3, 9], base_logprobs: vec![-0.4, -1.3, f64::NEG_INFINITY] },
            RowCandidates { ids: vec![1, 2, 5], base_logprobs: vec![-0.9, -0.7, -2.5] },
        ];
        let values = vec![
            RowValues { q: vec![0.2, 1.5, -3.0, 0.0, -0.5, 2.0], own: vec![], guide: vec![] },
            RowValues { q: vec![1.0, 0.0, 0.25, -1.0, 0.5, 0.0], own: vec![], guide: vec![] },
        ];
        (cands, values, vec![0.7, 0.3, 0.2, 1.1])
    }

    fn softmax(z: &[f64]) -> Vec<f64> {
        let m = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = z.iter().map(|x| (x - m).exp()).collect();
        let s: f64 = e.iter().sum();
        e.iter().map(|x| x / s).collect()
    }

    fn run_policy(method: DecodeMethod, tau: f64) -> StepPolicy {
        let (cands, values, weights) = two_rows();
        let names = vec!["a".to_string(), "b".to_string()];
        let rule = PolicyRule {
            method,
            tau,
            normalize: Normalize::ShiftMin,
            backend: Backend::Cpu,
            names: &names,
            parm_beta: 1.0,
        };
        let mut out = StepPolicy::default();
        policy(&rule, &cands, &values, &weights, &mut out).unwrap();
        out
    }

    #[test]
    fn the_policy_stage_matches_base_and_linear_formulas() {
        let (cands, values, weights) = two_rows();
        let base = run_policy(DecodeMethod::Base, 0.2);
        let tau = 0.2;
        let linear = run_policy(DecodeMethod::Linear, tau);
        for i in 0..2 {
            let lp = &cands[i].base_logprobs;
            let want = softmax(lp);
            assert!(base.row(i).iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-12), "base row {i}");
            // softmax(log pi0 + sum_j w_j (q_j - min q_j) / tau), the minimum over candidates that pi0 allows.
            let mut z = lp.clone();
            for j in 0..2 {
                let q = values[i].principal(j, 3);
                let live: Vec<f64> = (0..3).filter(|&a| lp[a].is_finite()).map(|a| q[a]).collect();
                let lo = live.iter().copied().fold(f64::INFINITY, f64::min);
                for a in 0..3 {
                    z[a] += weights[i * 2 + j] * (q[a] - lo) / tau;
                }
            }
            let want = softmax(&z);
            let got = linear.row(i);
            assert!(got.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-12), "linear row {i}: {got:?} {want:?}");
            assert_eq!(got[2] == 0.0, i == 0, "an excluded candidate gets probability 0");
        }
        assert!(base.info.iter().all(|s| *s == SolveInfo::default()));
    }

    #[test]
    fn the_policy_stage_reports_the_equilibrium() {
        let cage = run_policy(DecodeMethod::Cage, 0.1);
        assert_eq!((cage.rows(), cage.candidates), (2, 3));
        for i in 0..2 {
            assert!((cage.row(i).iter().sum::<f64>() - 1.0).abs() < 1e-9);
            assert!(cage.info[i].converged && cage.info[i].iterations >= 1);
            assert!(!cage.info[i].paid.is_empty(), "someone pays at tau 0.1 with these values");
        }
    }

    #[test]
    fn choice_is_greedy_or_keyed() {
        let mut scratch = vec![];
        assert_eq!(choose(&[0.2, 0.5, 0.3], Choice::Greedy, 0, 0, 0, &mut scratch).unwrap(), 1);
        let a = choose(&[0.2, 0.5, 0.3], Choice::Gumbel, 7, 1, 3, &mut scratch).unwrap();
        assert_eq!(a, choose(&[0.2, 0.5, 0.3], Choice::Gumbel, 7, 1, 3, &mut scratch).unwrap());
        assert!(choose(&[0.0, 0.0], Choice::Greedy, 0, 0, 0, &mut scratch).is_err());
        assert!(kl_to_base(&[0.5, 0.5], &[0.5f64.ln(), 0.5f64.ln()]).abs() < 1e-15);
    }
}
