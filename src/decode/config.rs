//! The run configuration of `cage generate`, `cage sweep` and `cage bench decode`: one JSON file names the base
//! model, the principals, their weights, the method and the decoding limits; command-line flags override the
//! weights and the method so that one file serves a whole sweep.

use super::prompts::PromptTemplate;
use crate::backend::Backend;
use crate::error::{CageError, Result};
use crate::gpu::KvCacheType;
use crate::model::{PromptFormat, Tokenizer};
use crate::problem::Normalize;
use crate::sampling::Choice;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// How a decoding step turns the base policy and the principals' values into the policy it samples from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum DecodeMethod {
    /// The base model alone (principals are still evaluated, for scoring).
    Base,
    /// softmax(log pi0 + sum_j v_j / tau): every principal pays its whole value.
    Linear,
    /// GenARM: pi ~ pi_base * prod_j pi_j^(w_j), pi_j a principal's policy (its values when it has none).
    Genarm,
    /// MOD (reverse KL): pi ~ prod_j pi_j^(w_j) over the principals' policies, without the base.
    Mod,
    /// The exact equilibrium of the common-agency game.
    #[default]
    Cage,
    /// The authors' truncated Algorithm 1: an approximate equilibrium.
    CagePaper,
    /// PARM: pi ~ pi_base * pi_PARM(. | alpha)^(1 / parm_beta), the PBLoRA ARM of the `parm` principals at the
    /// row's preference alpha = sum_j w_j preference_j.
    Parm,
}

crate::spelled!(DecodeMethod, "decoding method");

impl DecodeMethod {
    /// Every method that runs on any principals, in the order tables list them (`parm` needs `parm` principals).
    pub const ALL: [DecodeMethod; 6] = [Self::Base, Self::Linear, Self::Genarm, Self::Mod, Self::Cage, Self::CagePaper];
}

/// The `prompt_format` of a run: `auto` (the model's chat template when its tokenizer has one, else plain) or
/// one of [`PromptFormat`]'s formats.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum FormatSetting {
    /// The chat template when the tokenizer has one, else plain text.
    #[default]
    Auto,
    /// The model's chat template.
    Chat,
    /// The prompt as given.
    Plain,
    /// `### Instruction:` / `### Response:`.
    Alpaca,
}

crate::spelled!(FormatSetting, "prompt format");

/// What a principal model whose `tokenizer.json` differs from the run's tokenizer means.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum TokenizerMismatch {
    /// An error naming the model: the principals score the run tokenizer's ids, which another tokenizer reads
    /// as other tokens.
    #[default]
    Error,
    /// Opted in: the models read the run tokenizer's ids as their own (the same vocabulary saved differently).
    Allow,
    /// Opted in: a principal model with its own tokenizer reads text, as the authors' HH setting does: its
    /// prompt is encoded with its tokenizer, each chosen token's text is re-encoded for it, and a candidate's
    /// value is read at the first of its text's ids.
    Retokenize,
}

crate::spelled!(TokenizerMismatch, "tokenizer_mismatch");

impl FormatSetting {
    /// The format prompts are rendered in with `tokenizer`.
    pub fn resolve(self, tokenizer: &Tokenizer) -> PromptFormat {
        match self {
            Self::Auto if tokenizer.has_chat_template() => PromptFormat::Chat,
            Self::Auto | Self::Plain => PromptFormat::Plain,
            Self::Chat => PromptFormat::Chat,
            Self::Alpaca => PromptFormat::Alpaca,
        }
    }
}

/// Where a principal's values come from.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PrincipalKind {
    /// An autoregressive reward model: q = log pi_ARM - log pi_ref at the candidates.
    Arm {
        /// The ARM's backbone folder (default: the base model).
        #[serde(default)]
        model: Option<PathBuf>,
        /// A PEFT LoRA adapter on that backbone (unmerged; rows of one backbone run as one batch).
        #[serde(default)]
        adapter: Option<PathBuf>,
        /// The reference model folder (default: the ARM's backbone without the adapter).
        #[serde(default)]
        reference: Option<PathBuf>,
    },
    /// A model told the objective: q = log pi(a | instruction, context) - log pi(a | context).
    Prompted {
        /// The model folder (default: the base model).
        #[serde(default)]
        model: Option<PathBuf>,
        /// The instruction describing the objective, put before the user's prompt.
        instruction: String,
    },
    /// Token values from scored words: a token whose text (trimmed, lower case) is a listed word gets its score.
    Lexicon {
        /// Word -> score.
        #[serde(default)]
        words: BTreeMap<String, f64>,
        /// Score of every other token.
        #[serde(default)]
        default: f64,
    },
    /// PARM's preference-aware ARM at a fixed preference (CAGE+ takes the unit vectors): valued as an ARM,
    /// q = log pi_PARM(. | preference) - log pi_backbone.
    Parm {
        /// The backbone folder (default: the base model).
        #[serde(default)]
        model: Option<PathBuf>,
        /// The PBLoRA adapter folder, as PARM saves it.
        adapter: PathBuf,
        /// The preference vector, one entry per objective of the adapter (`[1, 0]`: the first objective).
        preference: Vec<f64>,
    },
}

/// One principal of a run.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(from = "RawPrincipal")]
pub struct PrincipalSpec {
    /// Its name in outputs (scores, CSV columns, diagnostics).
    pub name: String,
    /// Its value source.
    #[serde(flatten)]
    pub kind: PrincipalKind,
}

/// A principal as written in a config: `name` and `kind` beside the kind's fields, and nothing else. (A
/// flattened `kind` would let a misspelt field through: `deny_unknown_fields` does not reach inside `flatten`.)
#[derive(Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
enum RawPrincipal {
    Arm {
        name: String,
        #[serde(default)]
        model: Option<PathBuf>,
        #[serde(default)]
        adapter: Option<PathBuf>,
        #[serde(default)]
        reference: Option<PathBuf>,
    },
    Prompted {
        name: String,
        #[serde(default)]
        model: Option<PathBuf>,
        instruction: String,
    },
    Lexicon {
        name: String,
        #[serde(default)]
        words: BTreeMap<String, f64>,
        #[serde(default)]
        default: f64,
    },
    Parm {
        name: String,
        #[serde(default)]
        model: Option<PathBuf>,
        adapter: PathBuf,
        preference: Vec<f64>,
    },
}

impl From<RawPrincipal> for PrincipalSpec {
    fn from(r: RawPrincipal) -> Self {
        let (name, kind) = match r {
            RawPrincipal::Arm { name, model, adapter, reference } => {
                (name, PrincipalKind::Arm { model, adapter, reference })
            }
            RawPrincipal::Prompted { name, model, instruction } => {
                (name, PrincipalKind::Prompted { model, instruction })
            }
            RawPrincipal::Lexicon { name, words, default } => (name, PrincipalKind::Lexicon { words, default }),
            RawPrincipal::Parm { name, model, adapter, preference } => {
                (name, PrincipalKind::Parm { model, adapter, preference })
            }
        };
        PrincipalSpec { name, kind }
    }
}

fn default_tau() -> f64 {
    0.1
}
fn default_k() -> usize {
    50
}
fn default_max_new() -> usize {
    64
}
fn default_batch() -> usize {
    8
}
fn default_cpu() -> Backend {
    Backend::Cpu
}
fn default_parm_beta() -> f64 {
    1.0
}

/// A decoding run, as read from a JSON config file.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// The base (agent) model folder.
    pub base: PathBuf,
    /// Folder with `tokenizer.json` (default: the base model's folder). Every model must use this tokenizer.
    #[serde(default)]
    pub tokenizer: Option<PathBuf>,
    /// `error` (the default), `allow` or `retokenize`: a model folder whose own `tokenizer.json` differs from
    /// the run's.
    #[serde(default)]
    pub tokenizer_mismatch: TokenizerMismatch,
    /// The principals (objectives).
    #[serde(default)]
    pub principals: Vec<PrincipalSpec>,
    /// One weight per principal (default: 1 / J each).
    #[serde(default)]
    pub weights: Option<Vec<f64>>,
    /// Decoding method.
    #[serde(default)]
    pub method: DecodeMethod,
    /// The agent's temperature.
    #[serde(default = "default_tau")]
    pub tau: f64,
    /// The `parm` method's beta: pi ~ pi_base * pi_PARM^(1 / beta) (1, PARM's own setting, by default).
    #[serde(default = "default_parm_beta")]
    pub parm_beta: f64,
    /// Candidates per step: the base model's top-k (0 = the whole vocabulary).
    #[serde(default = "default_k")]
    pub k: usize,
    /// Value preprocessing (`shift_min` or `none`).
    #[serde(default)]
    pub normalize: Normalize,
    /// The token choice: `greedy` or `sample` (the Gumbel-max draw, also spelled `gumbel`; `race` is the same
    /// draw by an exponential race).
    #[serde(default)]
    pub sampling: Choice,
    /// Sampling seed (draws are keyed by seed, row and step).
    #[serde(default)]
    pub seed: u64,
    /// Token limit per prompt.
    #[serde(default = "default_max_new")]
    pub max_new_tokens: usize,
    /// Stop strings (the text is cut before them).
    #[serde(default)]
    pub stop: Vec<String>,
    /// `auto` (chat template when the tokenizer has one), `chat`, `plain` or `alpaca`.
    #[serde(default)]
    pub prompt_format: FormatSetting,
    /// A template with one `{prompt}` (Beaver's `"BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:"`),
    /// encoded as plain text; instead of `prompt_format`.
    #[serde(default)]
    pub prompt_template: Option<PromptTemplate>,
    /// Where the equilibrium runs: `cpu`, `cuda`, `emulation` or `auto` (the default: the GPU when usable).
    /// When the forwards run on a device and the step stays there (see `model_device`), the equilibrium runs
    /// on that device whatever this says: the logits are there.
    #[serde(default)]
    pub backend: Backend,
    /// Where the forward passes run: `cpu` (the default), `cuda` (bf16 weights, cuBLAS), `emulation` (the GPU
    /// code path on the host emulation: tiny models and tests only) or `auto` (the GPU when usable). On a
    /// device the whole decoding step stays there (candidates, values, policy, choice; see
    /// src/decode/resident.rs), apart from the documented host round trips.
    #[serde(default = "default_cpu")]
    pub model_device: Backend,
    /// The GPU decoder's KV cache (`model_device` `cuda` or `emulation`): `f32` (the default, keys and values
    /// exact) or `bf16` (half the bytes: twice the rows or context fit; logits move by about a bf16 rounding of
    /// the attention inputs, see docs/architecture.md).
    #[serde(default)]
    pub kv_cache: KvCacheType,
    /// How a GPU `model_device` holds the models' linear layers: `bf16` (the default), `int8` / `int4`
    /// weight-only quantization at upload (a 65B base and its ARMs on one card; see src/model/devquant.rs), or
    /// `stored` (GGUF blocks as the model holds them, other formats bf16).
    /// Anything but bf16 with the forwards on the CPU is an error.
    #[serde(default)]
    pub gpu_weights: crate::model::devquant::GpuWeights,
    /// How the models' matrices are held in host memory once loaded: `stored` (the default: bf16, f16 and GGUF
    /// blocks as the files hold them, multiplied directly) or `f32` (every matrix expanded: four bytes a
    /// parameter, the reference the stored formats are tested against).
    #[serde(default)]
    pub cpu_weights: crate::model::weight::WeightStorage,
    /// Prompts (rows) decoded together.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// Reward models that score every result; sweeps then compute HV and MIP on their scores.
    #[serde(default)]
    pub scorers: Vec<super::scorers::ScorerSpec>,
}

impl RunConfig {
    /// Reads and checks a config file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| CageError::Io { context: format!("reading config {}", path.display()), source })?;
        Self::parse(&text).map_err(|e| match e {
            CageError::InvalidArgument(m) => CageError::InvalidArgument(format!("config {}: {m}", path.display())),
            e => e,
        })
    }

    /// Parses and checks a config given as JSON text.
    pub fn parse(text: &str) -> Result<Self> {
        // The path of the wrong field in the message: `principals[1]: unknown field `modle``, `tau: invalid type`.
        let cfg: RunConfig =
            serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_str(text)).map_err(|e| {
                let path = e.path().to_string();
                let inner = e.into_inner();
                CageError::InvalidArgument(if path == "." { inner.to_string() } else { format!("{path}: {inner}") })
            })?;
        cfg.check()?;
        Ok(cfg)
    }

    /// The weights of the run: the configured ones, or 1 / J each.
    pub fn weights(&self) -> Vec<f64> {
        let j = self.principals.len();
        self.weights.clone().unwrap_or_else(|| vec![1.0 / j.max(1) as f64; j])
    }

    /// Checks everything that can be checked without loading models.
    pub fn check(&self) -> Result<()> {
        let bad = |m: String| Err(CageError::InvalidArgument(m));
        if let Some(w) = &self.weights {
            let names: Vec<String> = self.principals.iter().map(|p| p.name.clone()).collect();
            check_weights(w, &names)?;
        }
        // The solvers' documented limit (docs/model.md, Limits), checked here so that a run fails before any
        // model loads rather than at its first equilibrium.
        if self.principals.len() > crate::solver::MAX_PRINCIPALS {
            return bad(format!(
                "principals: {} given; at most {} are supported (the equilibrium solvers' limit)",
                self.principals.len(),
                crate::solver::MAX_PRINCIPALS
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for p in &self.principals {
            if p.name.is_empty() || !seen.insert(p.name.as_str()) {
                return bad(format!("principal names must be unique and non-empty, got {:?}", p.name));
            }
            if let PrincipalKind::Prompted { instruction, .. } = &p.kind
                && instruction.trim().is_empty()
            {
                return bad(format!("prompted principal {:?} has an empty instruction", p.name));
            }
            if let PrincipalKind::Parm { preference, .. } = &p.kind
                && (preference.is_empty() || preference.iter().any(|x| !x.is_finite()))
            {
                return bad(format!(
                    "parm principal {:?}: preference must be a non-empty list of finite numbers, got {preference:?}",
                    p.name
                ));
            }
        }
        let names: Vec<&str> = self.principals.iter().map(|p| p.name.as_str()).collect();
        super::scorers::check_specs(&self.scorers, &names)?;
        if !crate::problem::valid_tau(self.tau) {
            return Err(CageError::BadTau(self.tau));
        }
        if !(self.parm_beta.is_finite() && self.parm_beta > 0.0) {
            return bad(format!("parm_beta must be a finite number > 0, got {}", self.parm_beta));
        }
        if self.batch_size == 0 {
            return bad("batch_size must be >= 1".into());
        }
        if self.prompt_template.is_some() && self.prompt_format != FormatSetting::Auto {
            return bad(format!(
                "prompt_template and prompt_format {} are two formats: give one (the template is encoded as plain text)",
                self.prompt_format
            ));
        }
        Ok(())
    }
}

/// Checks that `w` has one finite weight >= 0 per principal (named by `names`).
pub fn check_weights(w: &[f64], names: &[String]) -> Result<()> {
    if w.len() != names.len() {
        return Err(CageError::InvalidArgument(format!(
            "{} weights given for {} principals ({})",
            w.len(),
            names.len(),
            names.join(", ")
        )));
    }
    for (x, p) in w.iter().zip(names) {
        if !(x.is_finite() && *x >= 0.0) {
            return Err(CageError::BadWeight { principal: p.clone(), value: *x });
        }
    }
    Ok(())
}
