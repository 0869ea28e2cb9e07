//! Principals as value sources: the [`ValueSource`] trait and the three built-in kinds (ARM, prompted,
//! lexicon). A source declares the model forwards it needs ([`StreamSpec`]); the decoding loop runs every
//! stream of every row in one batch per model and hands each source the log-probabilities of its own streams.

use crate::error::{CageError, Result};
use crate::model::Tokenizer;
use std::collections::BTreeMap;

/// One forward stream: a model of the engine, an optional unmerged adapter on it, and an optional instruction
/// put before the user's prompt. Two sources asking for the same stream share its forward.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct StreamSpec {
    /// Index of the model in the engine (0 = the base model).
    pub model: usize,
    /// Adapter id on that model (`None`: the backbone alone).
    pub adapter: Option<usize>,
    /// Instruction prepended to the prompt (`None`: the prompt alone).
    pub instruction: Option<String>,
}

/// The next-token logits of one stream at the current step, with their log-normaliser.
#[derive(Clone, Copy, Debug)]
pub struct StreamLogits<'a> {
    /// Full-vocabulary logits.
    pub logits: &'a [f32],
    /// log sum exp of `logits`.
    pub lse: f64,
    /// For a model with its own tokenizer (`tokenizer_mismatch: retokenize`): the model's id for each base id,
    /// the first of the base token's text in its tokenizer. `None`: the ids are the base's.
    pub ids: Option<&'a [u32]>,
}

impl StreamLogits<'_> {
    /// log pi(id | context) of a base token id; a candidate outside this model's vocabulary is an error
    /// (mismatched models).
    pub fn logprob(&self, id: u32) -> Result<f64> {
        let own = match self.ids {
            Some(map) => map.get(id as usize).copied().unwrap_or(u32::MAX),
            None => id,
        };
        self.logits.get(own as usize).map(|&x| x as f64 - self.lse).ok_or_else(|| {
            CageError::InvalidArgument(format!(
                "candidate token {id} is outside a principal model's vocabulary of {}",
                self.logits.len()
            ))
        })
    }
}

/// What a source sees at one step of one row.
#[derive(Clone, Copy, Debug)]
pub struct StepView<'a> {
    /// Row index in the decode call.
    pub row: usize,
    /// Tokens generated so far for this row.
    pub generated: &'a [u32],
    /// The candidate token ids of this step.
    pub candidates: &'a [u32],
    /// The logits of the streams the source declared, in the order of [`ValueSource::streams`].
    pub streams: &'a [StreamLogits<'a>],
}

/// How the decoding step resident on the device computes a principal's values (see
/// [`ValueSource::device_form`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum DeviceForm<'a> {
    /// q = log pi(first stream) - log pi(second stream), and the first stream's log-probabilities as the
    /// principal's own policy: [`ArmSource`] and [`PromptedSource`].
    StreamRatio,
    /// q = the table's entry at the token (one per vocabulary id), the values as the own policy:
    /// [`LexiconSource`]; uploaded once per run.
    Table(&'a [f64]),
}

/// A principal's token values. Implement it to plug a custom objective into the decoding loop.
pub trait ValueSource: Send + Sync {
    /// The principal's name.
    fn name(&self) -> &str;
    /// The forwards this source needs at every step (none for a table or a rule).
    fn streams(&self) -> Vec<StreamSpec> {
        vec![]
    }
    /// Writes the raw values q at the candidates into `out` (one per candidate); higher is better.
    fn values(&self, view: &StepView, out: &mut [f64]) -> Result<()>;
    /// Writes the principal's own policy log-probabilities at the candidates (used by `genarm` and `mod`)
    /// and returns true, or returns false when it has none (those methods then use the values).
    fn policy(&self, _view: &StepView, _out: &mut [f64]) -> Result<bool> {
        Ok(false)
    }
    /// The same values (and own policy) as [`ValueSource::values`] and [`ValueSource::policy`] in a form the
    /// device computes, or None (the default): a source that only exists on the host. A run with such a source
    /// keeps its steps on the host: each stream's logits are downloaded at every step (see
    /// docs/architecture.md).
    fn device_form(&self) -> Option<DeviceForm<'_>> {
        None
    }
}

fn diff_of_streams(view: &StepView, out: &mut [f64], who: &str) -> Result<()> {
    let [a, b] = view.streams else {
        return Err(CageError::InvalidArgument(format!(
            "principal {who} expects 2 streams, got {}",
            view.streams.len()
        )));
    };
    for (o, &id) in out.iter_mut().zip(view.candidates) {
        *o = a.logprob(id)? - b.logprob(id)?;
    }
    Ok(())
}

fn first_stream(view: &StepView, out: &mut [f64]) -> Result<bool> {
    let Some(a) = view.streams.first() else { return Ok(false) };
    for (o, &id) in out.iter_mut().zip(view.candidates) {
        *o = a.logprob(id)?;
    }
    Ok(true)
}

/// An autoregressive reward model: q = log pi_ARM - log pi_ref (GenARM's token-level implicit reward).
#[derive(Clone, Debug)]
pub struct ArmSource {
    /// Name.
    pub name: String,
    /// The ARM stream (backbone + adapter, or a separate model).
    pub arm: StreamSpec,
    /// The reference stream.
    pub reference: StreamSpec,
}

impl ValueSource for ArmSource {
    fn name(&self) -> &str {
        &self.name
    }
    fn streams(&self) -> Vec<StreamSpec> {
        vec![self.arm.clone(), self.reference.clone()]
    }
    fn values(&self, view: &StepView, out: &mut [f64]) -> Result<()> {
        diff_of_streams(view, out, &self.name)
    }
    fn policy(&self, view: &StepView, out: &mut [f64]) -> Result<bool> {
        first_stream(view, out)
    }
    fn device_form(&self) -> Option<DeviceForm<'_>> {
        Some(DeviceForm::StreamRatio)
    }
}

/// A training-free principal: q = log pi(a | instruction, context) - log pi(a | context) on one model.
#[derive(Clone, Debug)]
pub struct PromptedSource {
    /// Name.
    pub name: String,
    /// The model index in the engine.
    pub model: usize,
    /// The instruction describing the objective.
    pub instruction: String,
}

impl ValueSource for PromptedSource {
    fn name(&self) -> &str {
        &self.name
    }
    fn streams(&self) -> Vec<StreamSpec> {
        vec![
            StreamSpec { model: self.model, adapter: None, instruction: Some(self.instruction.clone()) },
            StreamSpec { model: self.model, adapter: None, instruction: None },
        ]
    }
    fn values(&self, view: &StepView, out: &mut [f64]) -> Result<()> {
        diff_of_streams(view, out, &self.name)
    }
    fn policy(&self, view: &StepView, out: &mut [f64]) -> Result<bool> {
        first_stream(view, out)
    }
    fn device_form(&self) -> Option<DeviceForm<'_>> {
        Some(DeviceForm::StreamRatio)
    }
}

/// Token values from a scored word list, mapped once onto the tokenizer's vocabulary.
#[derive(Clone, Debug)]
pub struct LexiconSource {
    /// Name.
    pub name: String,
    /// One value per vocabulary id.
    pub table: Vec<f64>,
}

impl LexiconSource {
    /// Maps `words` onto the vocabulary: a token whose decoded text, trimmed and lower-cased, is a listed word
    /// gets that word's score; every other token gets `default`.
    pub fn new(name: &str, words: &BTreeMap<String, f64>, default: f64, tok: &Tokenizer, vocab: usize) -> Result<Self> {
        if !default.is_finite() {
            return Err(CageError::InvalidArgument(format!("lexicon {name:?}: default score must be finite")));
        }
        let words: BTreeMap<String, f64> = words.iter().map(|(w, s)| (w.trim().to_lowercase(), *s)).collect();
        if let Some((w, s)) = words.iter().find(|(_, s)| !s.is_finite()) {
            return Err(CageError::InvalidArgument(format!("lexicon {name:?}: score of {w:?} is {s}")));
        }
        let mut table = vec![default; vocab];
        for (id, t) in table.iter_mut().enumerate() {
            let text = tok.decode(&[id as u32], true).unwrap_or_default();
            if let Some(s) = words.get(&text.trim().to_lowercase()) {
                *t = *s;
            }
        }
        Ok(LexiconSource { name: name.into(), table })
    }
}

impl ValueSource for LexiconSource {
    fn name(&self) -> &str {
        &self.name
    }
    fn values(&self, view: &StepView, out: &mut [f64]) -> Result<()> {
        for (o, &id) in out.iter_mut().zip(view.candidates) {
            *o = self.table.get(id as usize).copied().unwrap_or(0.0);
        }
        Ok(())
    }
    fn device_form(&self) -> Option<DeviceForm<'_>> {
        Some(DeviceForm::Table(&self.table))
    }
}
