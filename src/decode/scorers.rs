//! Reward-model scorers of a run (`"scorers"` in the config): each scores every result's prompt and response
//! with a native reward model ([`RewardModel`]); sweeps compute HV and MIP on these scores, sign applied,
//! instead of the principals' implicit rewards.
//!
//! A scorer's `template` builds the text it scores: `{prompt}` is replaced by the user's prompt and `{response}`
//! by the decoded text, wherever they appear; every other character is literal. The text is then tokenized by
//! the scorer model's own tokenizer with its special tokens, as `cage score --text` does.

use crate::error::{CageError, Result};
use crate::model::{RewardModel, Tokenizer};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// The template of a scorer without one: the prompt, a space, the response.
pub const DEFAULT_TEMPLATE: &str = "{prompt} {response}";

/// Whether a higher score is better (`1`) or worse (`-1`, a cost model such as Beaver's).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "i64", into = "i64")]
pub enum Sign {
    /// Higher is better.
    #[default]
    Plus,
    /// Lower is better: HV and MIP see the negated score.
    Minus,
}

impl TryFrom<i64> for Sign {
    type Error = String;
    fn try_from(x: i64) -> std::result::Result<Self, String> {
        match x {
            1 => Ok(Sign::Plus),
            -1 => Ok(Sign::Minus),
            _ => Err(format!("sign must be 1 or -1, got {x}")),
        }
    }
}

impl From<Sign> for i64 {
    fn from(s: Sign) -> i64 {
        match s {
            Sign::Plus => 1,
            Sign::Minus => -1,
        }
    }
}

/// One scorer as written in a run config.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScorerSpec {
    /// Its name in outputs (the `scores` of each result line, sweep columns).
    pub name: String,
    /// The reward model folder (config.json, weights with a score head, tokenizer.json).
    pub model: PathBuf,
    /// The scored text, with `{prompt}` and `{response}` placeholders (default [`DEFAULT_TEMPLATE`]).
    #[serde(default)]
    pub template: Option<String>,
    /// Which of the model's scores (label / score dimension) this scorer reads.
    #[serde(default)]
    pub label: usize,
    /// `1`: higher is better; `-1`: lower is better.
    #[serde(default)]
    pub sign: Sign,
}

impl ScorerSpec {
    /// The template in use.
    pub fn template(&self) -> &str {
        self.template.as_deref().unwrap_or(DEFAULT_TEMPLATE)
    }

    /// The name of the oriented score (sign applied) in sweep tables: `-name` for a cost.
    pub fn oriented_name(&self) -> String {
        match self.sign {
            Sign::Plus => self.name.clone(),
            Sign::Minus => format!("-{}", self.name),
        }
    }
}

/// Checks the scorers of a config without loading models: unique names that are not principal names (both
/// go into a result's `scores`), and templates with both placeholders.
pub fn check_specs(specs: &[ScorerSpec], principals: &[&str]) -> Result<()> {
    let mut seen = std::collections::HashSet::new();
    for (i, s) in specs.iter().enumerate() {
        let bad = |m: String| Err(CageError::InvalidArgument(format!("scorers[{i}].{m}")));
        if s.name.is_empty() || !seen.insert(s.name.as_str()) {
            return bad(format!("name: scorer names must be unique and non-empty, got {:?}", s.name));
        }
        if principals.contains(&s.name.as_str()) {
            return bad(format!(
                "name: {:?} is also a principal's name; results hold both kinds of scores, so name them apart",
                s.name
            ));
        }
        for p in ["{prompt}", "{response}"] {
            if !s.template().contains(p) {
                return bad(format!(
                    "template: {:?} has no {p} placeholder (it needs {{prompt}} and {{response}})",
                    s.template()
                ));
            }
        }
    }
    Ok(())
}

struct Loaded {
    spec: ScorerSpec,
    model: RewardModel,
    tokenizer: Tokenizer,
}

/// The loaded scorers of a command (each model loaded once).
pub struct Scorers {
    items: Vec<Loaded>,
}

impl Scorers {
    /// Loads every scorer's model and tokenizer and checks its label against the model's head, so that a bad
    /// scorer fails before any decoding; their forward passes run on `device` (the run's `model_device`).
    pub fn load(specs: &[ScorerSpec], device: crate::Backend) -> Result<Self> {
        let mut items = Vec::with_capacity(specs.len());
        for (i, spec) in specs.iter().enumerate() {
            let at = |e: CageError| CageError::InvalidArgument(format!("scorers[{i}] ({:?}): {e}", spec.name));
            let model = RewardModel::load(&spec.model).map_err(at)?.on(device);
            if spec.label >= model.labels() {
                return Err(CageError::InvalidArgument(format!(
                    "scorers[{i}].label: {} is out of range: model {} has {} score(s), labels 0 to {}",
                    spec.label,
                    spec.model.display(),
                    model.labels(),
                    model.labels() - 1
                )));
            }
            let tokenizer = Tokenizer::load(&spec.model).map_err(at)?;
            items.push(Loaded { spec: spec.clone(), model, tokenizer });
        }
        Ok(Scorers { items })
    }

    /// Whether the run has no scorers.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The scorers' names.
    pub fn names(&self) -> Vec<String> {
        self.items.iter().map(|s| s.spec.name.clone()).collect()
    }

    /// The names of the oriented scores (see [`ScorerSpec::oriented_name`]).
    pub fn oriented_names(&self) -> Vec<String> {
        self.items.iter().map(|s| s.spec.oriented_name()).collect()
    }

    /// Each scorer's raw score (its label's) of one prompt and response.
    pub fn score(&mut self, prompt: &str, response: &str) -> Result<Vec<f64>> {
        self.items
            .iter_mut()
            .map(|s| {
                let text = render(s.spec.template(), prompt, response);
                let ids = s.tokenizer.encode(&text, true)?;
                if ids.is_empty() {
                    return Err(CageError::InvalidArgument(format!(
                        "scorer {:?}: the text encodes to no tokens",
                        s.spec.name
                    )));
                }
                Ok(s.model.scores(&[&ids])?[0][s.spec.label] as f64)
            })
            .collect()
    }

    /// Raw scores with each scorer's sign applied (higher is better for all): what HV and MIP see.
    pub fn oriented(&self, raw: &[f64]) -> Vec<f64> {
        self.items
            .iter()
            .zip(raw)
            .map(|(s, &x)| match s.spec.sign {
                Sign::Plus => x,
                Sign::Minus => -x,
            })
            .collect()
    }
}

/// The template with its placeholders replaced in one pass (a prompt that contains `{response}` stays as it is).
pub fn render(template: &str, prompt: &str, response: &str) -> String {
    let mut out = String::with_capacity(template.len() + prompt.len() + response.len());
    let mut rest = template;
    while let Some(i) = rest.find('{') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(r) = tail.strip_prefix("{prompt}") {
            out.push_str(prompt);
            rest = r;
        } else if let Some(r) = tail.strip_prefix("{response}") {
            out.push_str(response);
            rest = r;
        } else {
            out.push('{');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

/// A result line with the scorers' raw scores added to its `scores` under their names.
pub fn with_scores(mut line: serde_json::Value, names: &[String], scores: &[f64]) -> serde_json::Value {
    if let Some(m) = line.get_mut("scores").and_then(|s| s.as_object_mut()) {
        for (n, s) in names.iter().zip(scores) {
            m.insert(n.clone(), serde_json::json!(s));
        }
    }
    line
}
